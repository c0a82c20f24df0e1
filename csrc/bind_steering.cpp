// Steering methods on _core.Context (the class is defined in bind_context.cpp).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "errors.h"
#include "steering.h"

namespace py = pybind11;

namespace llama_steer {

namespace {
using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
}

void register_steering(py::module_& m) {
    py::class_<llama_steer_stats>(m, "SteerStats")
        .def_readonly("n_reserve", &llama_steer_stats::n_reserve)
        .def_readonly("n_graph_build", &llama_steer_stats::n_graph_build)
        .def_readonly("n_graph_reuse", &llama_steer_stats::n_graph_reuse)
        .def_readonly("topology_version", &llama_steer_stats::topology_version)
        .def_readonly("n_graph_nodes", &llama_steer_stats::n_graph_nodes,
                      "Nodes of the last graph built (after capture-only pruning).")
        .def_readonly("n_graph_ops", &llama_steer_stats::n_graph_ops,
                      "Nodes of the last graph that compute (views and reshapes do not); on the CPU "
                      "each ends with a thread barrier.")
        .def("__repr__", [](const llama_steer_stats& s) {
            return "SteerStats(n_reserve=" + std::to_string(s.n_reserve) + ", n_graph_build=" +
                   std::to_string(s.n_graph_build) + ", n_graph_reuse=" + std::to_string(s.n_graph_reuse) +
                   ", topology_version=" + std::to_string(s.topology_version) +
                   ", n_graph_nodes=" + std::to_string(s.n_graph_nodes) +
                   ", n_graph_ops=" + std::to_string(s.n_graph_ops) + ")";
        });

    auto ctx = py::reinterpret_borrow<py::class_<Context>>(m.attr("Context"));
    ctx.def("steer_init", [](Context& c, int32_t n_slots, int32_t n_dirs) { Steering(c).init(n_slots, n_dirs); },
            py::arg("n_slots"), py::arg("n_dirs"))
        .def_property_readonly("steer_n_slots", [](Context& c) { return Steering(c).n_slots(); })
        .def_property_readonly("steer_n_dirs", [](Context& c) { return Steering(c).n_dirs(); })
        .def("steer_layer_hooked", [](Context& c, int32_t il) { return Steering(c).layer_hooked(il); },
             py::arg("il"))
        .def(
            "steer_set_add",
            [](Context& c, int32_t slot, int32_t il, std::optional<f32_array> data) {
                if (!data) return Steering(c).set_add(slot, il, nullptr, 0);
                if (data->ndim() != 1) throw InvalidArgument("a steering vector must be 1-D");
                Steering(c).set_add(slot, il, data->data(), static_cast<int32_t>(data->shape(0)));
            },
            py::arg("slot"), py::arg("il"), py::arg("data"))
        .def(
            "steer_set_ablate",
            [](Context& c, int32_t slot, int32_t il, std::optional<f32_array> dirs, float coef) {
                if (!dirs) return Steering(c).set_ablate(slot, il, nullptr, 0, 0, coef);
                if (dirs->ndim() != 2) throw InvalidArgument("ablation directions must be 2-D [n_dirs, n_embd]");
                Steering(c).set_ablate(slot, il, dirs->data(), static_cast<int32_t>(dirs->shape(0)),
                                       static_cast<int32_t>(dirs->shape(1)), coef);
            },
            py::arg("slot"), py::arg("il"), py::arg("dirs"), py::arg("coef"))
        .def(
            "steer_set_rows",
            [](Context& c, int32_t slot, int32_t il, std::optional<f32_array> rows) {
                if (!rows) return Steering(c).set_rows(slot, il, nullptr, 0, 0);
                if (rows->ndim() != 2) throw InvalidArgument("steering rows must be 2-D [n_rows, n_embd]");
                Steering(c).set_rows(slot, il, rows->data(), static_cast<int32_t>(rows->shape(0)),
                                     static_cast<int32_t>(rows->shape(1)));
            },
            py::arg("slot"), py::arg("il"), py::arg("rows"))
        .def("steer_slot_n_rows", [](Context& c, int32_t slot) { return Steering(c).n_rows(slot); },
             py::arg("slot"))
        .def("steer_clear", [](Context& c, int32_t slot) { Steering(c).clear(slot); }, py::arg("slot"))
        .def(
            "steer_bind",
            [](Context& c, llama_seq_id seq, int32_t slot, float strength, llama_pos p0, llama_pos p1) {
                Steering(c).bind(seq, slot, strength, p0, p1);
            },
            py::arg("seq"), py::arg("slot"), py::arg("strength"), py::arg("p0"), py::arg("p1"))
        .def("steer_unbind", [](Context& c, llama_seq_id seq, int32_t slot) { return Steering(c).unbind(seq, slot); },
             py::arg("seq"), py::arg("slot"))
        .def("steer_stats", [](Context& c) { return Steering(c).stats(); })
        .def(
            "steer_layer_buffer",
            [](Context& c, int32_t il, int32_t kind) { return Steering(c).layer_buffer(il, kind); },
            py::arg("il"), py::arg("kind") = 0);
}

}  // namespace llama_steer
