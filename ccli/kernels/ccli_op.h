// The dispatcher glue every native CPU kernel of a ccli op shares (fff_cpu.cpp, ternary_cpu.cpp, ...).
//
// An extension registers its C++ function as the CPU kernel of its op (TORCH_LIBRARY_IMPL(ccli, CPU, m)),
// so CPU calls of torch.ops.ccli.<op> reach C++ without a Python frame. The Python side decides the
// backend (ccli/kernels/registry.py, backends.py): it switches the C++ kernel on with configure(true)
// only while "native" is what CPU calls resolve to. Otherwise, and for inputs the C++ code does not
// handle (other dtypes), the kernel hands the call to the op's Python kernel (the fallback given to
// configure), with the GIL held:
//
//   at::Tensor my_op_cpu_kernel(const at::Tensor& x, ...) {
//     if (ccli_op::native_enabled() && supported(x, ...)) return my_op_impl(x, ...);
//     return ccli_op::call_fallback("ccli::my_op", x, ...);
//   }
//   TORCH_LIBRARY_IMPL(ccli, CPU, m) { m.impl("my_op", &my_op_cpu_kernel); }
//   PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { ccli_op::def_dispatch(m); ... }
//
// Everything here has internal linkage (an unnamed namespace): each extension is its own shared library
// with its own switch and fallback. (Inline variables would be GNU "unique" symbols, which the dynamic
// loader merges across libraries, so that one op's switch would also switch the other's.)

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace ccli_op {
namespace {

std::atomic<bool> g_native_enabled{false};
pybind11::object* g_fallback = nullptr;  // intentionally leaked: must outlive interpreter shutdown

// Whether the Python side selected this extension's kernel for CPU calls.
inline bool native_enabled() { return g_native_enabled.load(std::memory_order_relaxed); }

// Enable/disable the C++ kernel; a fallback that is not None replaces the Python kernel it defers to.
void configure(bool native_enabled, pybind11::object fallback) {
  if (!fallback.is_none()) {
    if (g_fallback == nullptr) {
      g_fallback = new pybind11::object(std::move(fallback));
    } else {
      *g_fallback = std::move(fallback);
    }
  }
  g_native_enabled.store(native_enabled, std::memory_order_relaxed);
}

// Arguments as the Python kernel receives them: an absent or undefined optional tensor is None,
// a string view a str; everything else as is.
inline pybind11::object py_arg(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? pybind11::cast(*t) : pybind11::none();
}
inline std::string py_arg(c10::string_view s) { return std::string(s.data(), s.size()); }
template <typename T>
T&& py_arg(T&& value) {
  return std::forward<T>(value);
}

// The op's Python kernel on these arguments (the call the C++ kernel does not compute itself).
template <typename... Args>
at::Tensor call_fallback(const char* op, Args&&... args) {
  pybind11::gil_scoped_acquire gil;
  TORCH_CHECK(g_fallback != nullptr, op, ": the native CPU kernel is loaded but no fallback is set");
  pybind11::object out = (*g_fallback)(py_arg(std::forward<Args>(args))...);
  return out.cast<at::Tensor>();
}

// Runs f without the GIL when the caller holds it, so other Python threads run while we compute.
template <typename F>
void without_gil(F&& f) {
  if (PyGILState_Check()) {
    pybind11::gil_scoped_release no_gil;
    f();
  } else {
    f();
  }
}

// The module functions the Python side calls: configure(native_enabled, fallback=None), native_enabled().
void def_dispatch(pybind11::module_& m) {
  m.def("configure", &configure, pybind11::arg("native_enabled"), pybind11::arg("fallback") = pybind11::none(),
        "Enable/disable the dispatcher CPU kernel and set the Python fallback it calls when disabled");
  m.def("native_enabled", [] { return g_native_enabled.load(); });
}

}  // namespace
}  // namespace ccli_op
