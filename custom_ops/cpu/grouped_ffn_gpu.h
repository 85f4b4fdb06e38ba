// GPU path of semoe_grouped_ffn, defined in custom_ops/cuda/grouped_ffn_gpu.cc (built only
// when Paddle has CUDA) and called by the binding in grouped_ffn_op.cc. Inputs are already
// checked by the binding (shapes, dtypes, places, activation name).
//   forward:  {out [R, D], hidden_pre [R, F]}
//   backward: {grad_x [R, D], grad_w1 [E, D, F], grad_b1 [E, F], grad_w2 [E, F, D], grad_b2 [E, D]}
#pragma once

#ifdef PADDLE_WITH_CUDA

#include <string>
#include <vector>

#include "paddle/extension.h"

namespace semoe {

std::vector<paddle::Tensor> GroupedFfnGpu(const paddle::Tensor& x, const paddle::Tensor& counts,
                                          const paddle::Tensor& w1, const paddle::Tensor& b1,
                                          const paddle::Tensor& w2, const paddle::Tensor& b2,
                                          const std::string& activation);

std::vector<paddle::Tensor> GroupedFfnGradGpu(const paddle::Tensor& x,
                                              const paddle::Tensor& counts,
                                              const paddle::Tensor& w1, const paddle::Tensor& w2,
                                              const paddle::Tensor& hidden_pre,
                                              const paddle::Tensor& grad_out,
                                              const std::string& activation);

}  // namespace semoe

#endif  // PADDLE_WITH_CUDA
