// The trainer (tune.h): numpy in, numpy out, the GIL released around training.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "errors.h"
#include "tune.h"

namespace py = pybind11;

namespace llama_steer {

namespace {
using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

template <typename T, typename A>
std::vector<T> to_vector(const A& a) {
    return std::vector<T>(a.data(), a.data() + a.size());
}
}  // namespace

void register_tune(py::module_& m) {
    py::class_<TrainerParams>(m, "TrainerParams")
        .def(py::init<>())
        .def_readwrite("n_ctx", &TrainerParams::n_ctx)
        .def_readwrite("n_threads", &TrainerParams::n_threads)
        .def_readwrite("batch_size", &TrainerParams::batch_size)
        .def_readwrite("lr", &TrainerParams::lr)
        .def_readwrite("weight_decay", &TrainerParams::weight_decay)
        .def_readwrite("adamw", &TrainerParams::adamw)
        .def_readwrite("trainable", &TrainerParams::trainable);

    py::class_<Trainer>(m, "Trainer")
        // Building the training graph reserves memory; nothing Python is touched.
        .def(py::init<std::shared_ptr<Model>, const TrainerParams&>(), py::arg("model"), py::arg("params"),
             py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("n_ctx", &Trainer::n_ctx)
        .def_property("lr", &Trainer::lr, &Trainer::set_lr)
        .def(
            "set_objective",
            [](Trainer& self, const std::vector<int32_t>& layers, const f32_array& dirs, int32_t mode, float weight,
               float token_weight) {
                self.set_objective(layers, to_vector<float>(dirs), mode, weight, token_weight);
            },
            py::arg("layers"), py::arg("dirs"), py::arg("mode"), py::arg("weight"), py::arg("token_weight"),
            "dirs: float32 [len(layers), n_embd]; mode 0 = in, 1 = out")
        .def("clear_objective", &Trainer::clear_objective)
        .def(
            "run",
            [](Trainer& self, const i32_array& tokens, const i32_array& labels, const f32_array& pos_weight,
               bool train) {
                auto t = to_vector<llama_token>(tokens);
                auto l = to_vector<llama_token>(labels);
                auto w = to_vector<float>(pos_weight);
                TrainStep step;
                {
                    // The vectors are copies owned by this frame; the trainer touches no Python object.
                    py::gil_scoped_release release;
                    step = self.run(t, l, w, train);
                }
                py::array_t<float> objective(static_cast<py::ssize_t>(step.objective.size()));
                std::copy(step.objective.begin(), step.objective.end(), objective.mutable_data());
                return py::make_tuple(step.loss, objective);
            },
            py::arg("tokens"), py::arg("labels"), py::arg("pos_weight"), py::arg("train") = true,
            "one sequence of n_ctx tokens -> (loss, per-layer objective values float32 [n_layer], NaN where none)")
        .def(
            "read_tensor",
            [](const Trainer& self, const std::string& name) {
                std::vector<float> data = self.read_tensor(name);
                std::vector<int64_t> shape = self.tensor_shape(name);
                std::vector<py::ssize_t> np_shape(shape.rbegin(), shape.rend());  // numpy order
                py::array_t<float> out(np_shape);
                std::copy(data.begin(), data.end(), out.mutable_data());
                return out;
            },
            py::arg("name"), "a model tensor's current values, float32 in numpy order");
}

}  // namespace llama_steer
