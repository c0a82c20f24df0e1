// ggml's quantizers and dequantizers over numpy arrays (see quant.h).
#include <pybind11/numpy.h>

#include "bindings.h"
#include "errors.h"
#include "quant.h"

namespace py = pybind11;

namespace llama_steer {

namespace {
using u8_array = py::array_t<uint8_t, py::array::c_style>;
using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
}  // namespace

void register_quant(py::module_& m) {
    m.def("quant_row_size", &quant_row_size, py::arg("type"), py::arg("n_per_row"),
          "bytes of one row of n_per_row values of ggml type `type`");
    m.def("quant_type_name", &quant_type_name, py::arg("type"));
    m.def("quant_can_roundtrip", &quant_can_roundtrip, py::arg("type"),
          "whether ggml can read `type` as float32 and write it back without an importance matrix");
    m.def(
        "dequantize",
        [](int32_t type, const u8_array& src, int64_t nrows, int64_t n_per_row) {
            // Shapes are checked before the output is allocated (check_shape in quant.cpp).
            quant_row_size(type, n_per_row);
            if (nrows < 0) throw InvalidArgument("nrows must be >= 0");
            py::array_t<float> out({nrows, n_per_row});
            const auto* in = src.data();
            const size_t n_in = static_cast<size_t>(src.nbytes());
            float* dst = out.mutable_data();
            {
                // Only the two buffers are touched; both are kept alive by this frame.
                py::gil_scoped_release release;
                dequantize_rows(type, in, n_in, dst, nrows, n_per_row);
            }
            return out;
        },
        py::arg("type"), py::arg("data"), py::arg("nrows"), py::arg("n_per_row"),
        "rows of ggml type `type` (raw bytes) -> float32 array [nrows, n_per_row]");
    m.def(
        "quantize",
        [](int32_t type, const f32_array& src, int32_t n_threads) {
            if (src.ndim() != 2) throw InvalidArgument("quantize takes a 2-D float32 array [rows, n_per_row]");
            const int64_t nrows = src.shape(0);
            const int64_t n_per_row = src.shape(1);
            const size_t row = quant_row_size(type, n_per_row);
            py::array_t<uint8_t> out({nrows, static_cast<int64_t>(row)});
            const float* in = src.data();
            uint8_t* dst = out.mutable_data();
            const size_t n_out = static_cast<size_t>(out.nbytes());
            {
                py::gil_scoped_release release;
                quantize_rows(type, in, dst, n_out, nrows, n_per_row, n_threads);
            }
            return out;
        },
        py::arg("type"), py::arg("data"), py::arg("n_threads") = 1,
        "float32 array [nrows, n_per_row] -> raw rows of ggml type `type` (uint8 [nrows, row bytes])");
}

}  // namespace llama_steer
