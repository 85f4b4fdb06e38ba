// Input checks shared by the Paddle bindings: every message names the op and the argument.
#pragma once

#include <string>
#include <vector>

#include "paddle/extension.h"

namespace semoe {

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline void check_tensor(const char* op, const char* arg, const paddle::Tensor& t,
                         paddle::DataType dtype, size_t rank, const char* layout) {
  PD_CHECK(t.dtype() == dtype, op, ": argument '", arg, "' must be ", dtype, ", got ", t.dtype());
  PD_CHECK(t.shape().size() == rank, op, ": argument '", arg, "' must have shape ", layout,
           ", got ", shape_str(t.shape()));
}

inline void check_same_place(const char* op, const char* arg, const paddle::Tensor& t,
                             const paddle::Tensor& ref) {
  PD_CHECK(t.place() == ref.place(), op, ": argument '", arg,
           "' must be on the same device as the first input");
}

inline void check_dim(const char* op, const char* what, int64_t got, int64_t want) {
  PD_CHECK(got == want, op, ": ", what, " must be ", want, ", got ", got);
}

}  // namespace semoe
