#include <pybind11/stl.h>

#include "bindings.h"
#include "llama-steer.h"
#include "model.h"

namespace py = pybind11;

namespace llama_steer {

void register_model(py::module_& m) {
    py::class_<Model, std::shared_ptr<Model>>(m, "Model")
        // Loading reads hundreds of MB; no Python object is touched.
        .def(py::init<const std::string&, int32_t, bool, const std::vector<std::string>&>(), py::arg("path"),
             py::arg("n_gpu_layers") = 0, py::arg("writable") = false, py::arg("rpc") = std::vector<std::string>{},
             py::call_guard<py::gil_scoped_release>())
        .def(
            "tensor_buffer",
            [](const Model& self, const std::string& name) {
                const ggml_tensor* t = llama_steer_model_tensor(self.get(), name.c_str());
                return t && t->buffer ? std::string(ggml_backend_buffer_name(t->buffer)) : std::string();
            },
            py::arg("name"), "The buffer type holding a weight tensor (\"\" if none).")
        .def_property_readonly("n_layer", &Model::n_layer)
        .def_property_readonly("n_embd", &Model::n_embd)
        .def_property_readonly("n_vocab", &Model::n_vocab)
        .def_property_readonly("n_ctx_train", &Model::n_ctx_train)
        .def_property_readonly("size", &Model::size)
        .def_property_readonly("n_params", &Model::n_params)
        .def_property_readonly("chat_template", &Model::chat_template)
        .def("meta", &Model::meta, py::arg("key"))
        .def("tokenize", &Model::tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"))
        .def(
            "token_to_piece",
            [](const Model& self, llama_token t, bool special) { return py::bytes(self.token_to_piece(t, special)); },
            py::arg("token"), py::arg("special"))
        .def(
            "detokenize",
            [](const Model& self, const std::vector<llama_token>& ids, bool remove_special, bool unparse_special) {
                return py::bytes(self.detokenize(ids, remove_special, unparse_special));
            },
            py::arg("tokens"), py::arg("remove_special"), py::arg("unparse_special"))
        .def("apply_chat_template", &Model::apply_chat_template, py::arg("messages"),
             py::arg("add_generation_prompt"))
        .def("is_eog", &Model::is_eog, py::arg("token"));
}

}  // namespace llama_steer
