// The one place where C++ exceptions become the Python classes defined in
// llama_steer/errors.py.
#include "bindings.h"
#include "errors.h"

namespace py = pybind11;

namespace llama_steer {

namespace {
void raise(const char* name, const std::exception& e) {
    py::object cls = py::module_::import("llama_steer.errors").attr(name);
    PyErr_SetString(cls.ptr(), e.what());
}
}  // namespace

void register_errors(py::module_&) {
    py::register_exception_translator([](std::exception_ptr p) {
        if (!p) return;
        try {
            std::rethrow_exception(p);
        } catch (const ModelLoadError& e) {
            raise("ModelLoadError", e);
        } catch (const ContextOverflowError& e) {
            raise("ContextOverflowError", e);
        } catch (const WorkerLostError& e) {
            raise("WorkerLostError", e);
        } catch (const DecodeError& e) {
            raise("DecodeError", e);
        } catch (const ClosedError& e) {
            raise("ClosedError", e);
        } catch (const ConcurrentUseError& e) {
            raise("ConcurrentUseError", e);
        } catch (const SteeringError& e) {
            raise("SteeringError", e);
        } catch (const Error& e) {
            raise("LlamaSteerError", e);
        } catch (const InvalidArgument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });
}

}  // namespace llama_steer
