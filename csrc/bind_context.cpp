#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "context.h"
#include "errors.h"
#include "sampler.h"

namespace py = pybind11;

namespace llama_steer {

void register_context(py::module_& m) {
    py::class_<ContextParams>(m, "ContextParams")
        .def(py::init<>())
        .def_readwrite("n_ctx", &ContextParams::n_ctx)
        .def_readwrite("n_batch", &ContextParams::n_batch)
        .def_readwrite("n_ubatch", &ContextParams::n_ubatch)
        .def_readwrite("n_seq_max", &ContextParams::n_seq_max)
        .def_readwrite("n_threads", &ContextParams::n_threads)
        .def_readwrite("embeddings", &ContextParams::embeddings)
        .def_readwrite("kv_f32", &ContextParams::kv_f32);

    py::class_<BatchTokens>(m, "BatchTokens")
        .def(py::init<>())
        .def(py::init([](std::vector<llama_token> t, std::vector<llama_pos> p, std::vector<llama_seq_id> s,
                         std::vector<int8_t> o) { return BatchTokens{std::move(t), std::move(p), std::move(s), std::move(o)}; }),
             py::arg("tokens"), py::arg("pos"), py::arg("seq"), py::arg("output"))
        .def(py::init([](std::vector<llama_token> t, std::vector<llama_pos> p, std::vector<llama_seq_id> s,
                         std::vector<int8_t> o, std::vector<int32_t> offsets) {
                 return BatchTokens{std::move(t), std::move(p), std::move(s), std::move(o), std::move(offsets)};
             }),
             py::arg("tokens"), py::arg("pos"), py::arg("seq"), py::arg("output"), py::arg("seq_offsets"));

    py::class_<Context>(m, "Context")
        .def(py::init<std::shared_ptr<Model>, const ContextParams&>(), py::arg("model"), py::arg("params"),
             py::call_guard<py::gil_scoped_release>())
        .def("close", &Context::close)
        .def_property_readonly("closed", &Context::closed)
        .def_property_readonly("n_ctx", &Context::n_ctx)
        .def_property_readonly("n_seq_max", &Context::n_seq_max)
        .def_property_readonly("n_batch", &Context::n_batch)
        .def_property_readonly("n_threads", &Context::n_threads)
        .def("clear", &Context::clear)
        .def("seq_rm", &Context::seq_rm, py::arg("seq"), py::arg("p0"), py::arg("p1"))
        .def("seq_cp", &Context::seq_cp, py::arg("src"), py::arg("dst"), py::arg("p0"), py::arg("p1"))
        // decode runs the whole forward pass on C++ data only; Python
        // objects were converted before the GIL is let go.
        .def("decode", &Context::decode, py::arg("batch"), py::call_guard<py::gil_scoped_release>())
        .def("decode_step", &Context::decode_step, py::arg("tokens"), py::arg("pos"), py::arg("seq"),
             py::call_guard<py::gil_scoped_release>())
        .def("set_capture_layers", &Context::set_capture_layers, py::arg("layers"))
        .def_property_readonly("capture_layers", &Context::capture_layers)
        .def(
            "decode_capture",
            [](Context& self, const BatchTokens& b, int32_t max_outputs, bool logits) {
                std::vector<float> rows;
                {
                    py::gil_scoped_release release;
                    rows = self.decode_capture(b, max_outputs, logits);
                }
                const auto n_cap = static_cast<py::ssize_t>(self.capture_layers().size());
                const auto n_embd = static_cast<py::ssize_t>(self.model().n_embd());
                const auto n_rows = static_cast<py::ssize_t>(rows.size()) / (n_cap * n_embd);
                py::array_t<float> out({n_rows, n_cap, n_embd});
                std::copy(rows.begin(), rows.end(), out.mutable_data());
                return out;
            },
            py::arg("batch"), py::arg("max_outputs") = 64, py::arg("logits") = true)
        .def(
            "embeddings",
            [](Context& self, int32_t i) {
                Context::Use use(self);
                const float* data = llama_get_embeddings_ith(self.get(), i);
                if (data == nullptr) throw InvalidArgument("no embeddings for batch row " + std::to_string(i));
                return py::array_t<float>(self.model().n_embd(), data);
            },
            py::arg("i") = -1)
        .def("set_upstream_cvec", &Context::set_upstream_cvec, py::arg("data"), py::arg("il_start"),
             py::arg("il_end"))
        .def(
            "logits",
            [](Context& self, int32_t i) {
                const float* data = self.logits(i);
                const py::ssize_t n = self.model().n_vocab();
                return py::array_t<float>(n, data);  // a copy: llama.cpp reuses its buffer
            },
            py::arg("i") = -1)
        .def("token_logprobs", &Context::token_logprobs, py::arg("rows"), py::arg("tokens"),
             py::call_guard<py::gil_scoped_release>());

    py::class_<SamplerParams>(m, "SamplerParams")
        .def(py::init<>())
        .def_readwrite("temperature", &SamplerParams::temperature)
        .def_readwrite("top_k", &SamplerParams::top_k)
        .def_readwrite("top_p", &SamplerParams::top_p)
        .def_readwrite("min_p", &SamplerParams::min_p)
        .def_readwrite("repeat_penalty", &SamplerParams::repeat_penalty)
        .def_readwrite("repeat_last_n", &SamplerParams::repeat_last_n)
        .def_readwrite("seed", &SamplerParams::seed);

    py::class_<Sampler>(m, "Sampler")
        .def(py::init<const SamplerParams&, int32_t>(), py::arg("params"), py::arg("n_vocab"))
        .def(
            "sample",
            [](Sampler& self, Context& ctx, int32_t idx) {
                Sample s;
                {
                    // Sampling sorts the whole vocabulary: plain C++ work.
                    py::gil_scoped_release release;
                    s = self.sample(ctx, idx);
                }
                return py::make_tuple(s.token, s.logprob);
            },
            py::arg("ctx"), py::arg("idx") = -1);
}

}  // namespace llama_steer
