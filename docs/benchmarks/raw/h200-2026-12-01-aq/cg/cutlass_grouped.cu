// Session 37 experiment: CUTLASS 3 (4.2 headers) pointer-array grouped GEMMs for Hopper, bf16 in, fp32 accumulate,
// bf16 out, D = A_g @ B_g^T per group g (A_g [M_g, K] row-major, B_g [N, K] row-major, D_g [M_g, N] row-major).
// A C ABI for ctypes: no torch headers. One entry point per kernel configuration.
#include <cstdio>
#include <vector>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using Elem = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;  // B [K, N] column-major: the weight [N, K] row-major
using LayoutD = cutlass::layout::RowMajor;
constexpr int Align = 8;

template <class Tile, class Cluster, class KSched, class ESched>
struct Grouped {
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD *, Align, Elem, LayoutD *, Align, ESched,
      cutlass::epilogue::fusion::LinearCombination<Elem, float, void>>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Elem, LayoutA *, Align, Elem, LayoutB *, Align, float,
      Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
      KSched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Main, Epi>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SA = typename Kernel::InternalStrideA;
  using SB = typename Kernel::InternalStrideB;
  using SD = typename Kernel::InternalStrideD;

  // strides: host-built, copied to the device buffers given; group g is N[g] x K[g]
  static int strides(int groups, const int *N, const int *K, void *sa, void *sb, void *sd) {
    std::vector<SA> a;
    std::vector<SB> b;
    std::vector<SD> d;
    for (int g = 0; g < groups; ++g) {
      a.push_back(cutlass::make_cute_packed_stride(SA{}, {1, K[g], 1}));
      b.push_back(cutlass::make_cute_packed_stride(SB{}, {N[g], K[g], 1}));
      d.push_back(cutlass::make_cute_packed_stride(SD{}, {1, N[g], 1}));
    }
    if (cudaMemcpy(sa, a.data(), groups * sizeof(SA), cudaMemcpyHostToDevice) != cudaSuccess) return -1;
    if (cudaMemcpy(sb, b.data(), groups * sizeof(SB), cudaMemcpyHostToDevice) != cudaSuccess) return -1;
    if (cudaMemcpy(sd, d.data(), groups * sizeof(SD), cudaMemcpyHostToDevice) != cudaSuccess) return -1;
    return 0;
  }

  static typename Gemm::Arguments args(int groups, void *shapes, const void **pa, void *sa, const void **pb, void *sb,
                                       void **pd, void *sd, int sms) {
    cutlass::KernelHardwareInfo hw = cutlass::KernelHardwareInfo::make_kernel_hardware_info<Kernel>(0, sms);
    typename Gemm::Arguments arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {groups, reinterpret_cast<typename ProblemShape::UnderlyingProblemShape *>(shapes), nullptr},
        {reinterpret_cast<const Elem **>(pa), reinterpret_cast<SA *>(sa), reinterpret_cast<const Elem **>(pb),
         reinterpret_cast<SB *>(sb)},
        {{}, nullptr, nullptr, reinterpret_cast<Elem **>(pd), reinterpret_cast<SD *>(sd)},
        hw};
    arguments.epilogue.thread.alpha = 1.0f;
    arguments.epilogue.thread.beta = 0.0f;
    return arguments;
  }

  static size_t workspace(int groups, int sms) {
    auto a = args(groups, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, sms);
    return Gemm::get_workspace_size(a);
  }

  static int run(int groups, void *shapes, const void **pa, void *sa, const void **pb, void *sb, void **pd, void *sd,
                 void *ws, int sms, cudaStream_t stream) {
    Gemm gemm;
    auto a = args(groups, shapes, pa, sa, pb, sb, pd, sd, sms);
    if (gemm.initialize(a, ws, stream) != cutlass::Status::kSuccess) return -2;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return -3;
    return cudaGetLastError() == cudaSuccess ? 0 : -4;
  }
};

using Coop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using CoopE = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
using PingE = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;

#define ENTRY(NAME, ...)                                                                                             \
  using NAME##_t = Grouped<__VA_ARGS__>;                                                                          \
  extern "C" int NAME##_strides(int g, const int *n, const int *k, void *sa, void *sb, void *sd) {                 \
    return NAME##_t::strides(g, n, k, sa, sb, sd);                                                                 \
  }                                                                                                                \
  extern "C" size_t NAME##_workspace(int g, int sms) { return NAME##_t::workspace(g, sms); }                      \
  extern "C" int NAME##_run(int g, void *shapes, const void **pa, void *sa, const void **pb, void *sb, void **pd,   \
                            void *sd, void *ws, int sms, void *stream) {                                           \
    return NAME##_t::run(g, shapes, pa, sa, pb, sb, pd, sd, ws, sms, reinterpret_cast<cudaStream_t>(stream));      \
  }

#ifndef CG_ONLY
ENTRY(coop_128x256_c1, Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopE)
ENTRY(ping_64x256_c1, Shape<_64, _256, _64>, Shape<_1, _1, _1>, Ping, PingE)
ENTRY(coop_128x256_c2, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopE)
ENTRY(coop_128x128_c1, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Coop, CoopE)
ENTRY(ping_128x128_c1, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Ping, PingE)
ENTRY(ping_64x128_c1, Shape<_64, _128, _64>, Shape<_1, _1, _1>, Ping, PingE)
ENTRY(coop_128x64_c1, Shape<_128, _64, _64>, Shape<_1, _1, _1>, Coop, CoopE)
ENTRY(ping_64x64_c1, Shape<_64, _64, _64>, Shape<_1, _1, _1>, Ping, PingE)
#else
ENTRY(coop_128x256_c1, Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopE)
#endif
