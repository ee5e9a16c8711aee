// oneDNN's LSTM and GRU primitives as XLA FFI custom calls, for hk_rnn on
// CPU.
//
// hk_rnn/_src/onednn.py loads this library with ctypes and registers six
// handlers with XLA (platform "cpu"):
//
//   hk_rnn_lstm_inference(x, w_i, w_h, b, c_0, h_0) -> (y, c_n, h_n)
//   hk_rnn_lstm_forward(x, w_i, w_h, b, c_0, h_0) -> (y, c_n, h_n, workspace)
//   hk_rnn_lstm_backward(x, w_i, w_h, b, c_0, h_0, y, c_n, h_n, workspace,
//                        d_y, d_c_n, d_h_n)
//       -> (d_x, d_w_i, d_w_h, d_b, d_c_0, d_h_0)
//   hk_rnn_gru_inference, hk_rnn_gru_forward, hk_rnn_gru_backward: the same
//       without c_0, c_n and their cotangents.
//
// all float32, time-major: x (T, B, D), w_i (D, G F), w_h (F, G F), carries
// (B, F), y (T, B, F). These are oneDNN's own layouts with one layer and
// one direction: x is `tnc`, w_i and w_h are `ldigo`, the bias `ldgo`, the
// carries `ldnc`. The LSTM's gate blocks are i, f, g, o and its bias b
// (4F,), hk_rnn's own; the GRU is oneDNN's linear-before-reset GRU, blocks
// u, r, c~ and a bias of four blocks (u, r, c~, c~'s recurrent bias), which
// the Python side maps hk_rnn's GRU onto. The weights are reordered into
// the primitive's preferred layout on each call (a fraction of a
// millisecond), so the primitive keeps them packed for the whole sequence.
// Primitives are built once per shape and cached.
//
// What cost time to find out, and the code relies on:
// * The scratchpad is the caller's (scratchpad_mode::user): oneDNN's own is
//   thread-local to the thread that created the primitive, and XLA calls the
//   handler from its worker threads.
// * h_0 and c_0 are always passed explicitly: with an empty src_iter the
//   forward pass is right but diff_weights_iter is not.
// * The backward primitive accumulates into diff_weights_* and diff_bias:
//   they are zeroed before it runs.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The library is built with hidden visibility; these are its entry points.
#define HK_RNN_EXPORT __attribute__((visibility("default")))

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

dnnl::engine& Engine() {
  // Never destroyed: handlers may still run while the process exits.
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Host buffers reused across calls, so that the scratchpad and the reordered
// weights do not page-fault fresh memory every time. Buffers are keyed by
// size; each call leases what it needs and gives it back when it returns.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool();
    return *pool;
  }

  void* Take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = free_.find(bytes);
      if (found != free_.end()) {
        void* data = found->second;
        free_.erase(found);
        return data;
      }
    }
    size_t rounded = (bytes + 63) / 64 * 64;
    void* data = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (data == nullptr) throw std::bad_alloc();
    return data;
  }

  void Give(size_t bytes, void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.emplace(bytes, data);
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
};

class Lease {
 public:
  Lease() = default;
  explicit Lease(size_t bytes)
      : bytes_(bytes), data_(Pool::Get().Take(bytes)) {}
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  Lease& operator=(Lease&& other) noexcept {
    std::swap(bytes_, other.bytes_);
    std::swap(data_, other.data_);
    return *this;
  }
  ~Lease() {
    if (data_ != nullptr) Pool::Get().Give(bytes_, data_);
  }
  void* data() const { return data_; }

 private:
  size_t bytes_ = 0;
  void* data_ = nullptr;
};

enum class Kind : int { kLstm = 0, kGru = 1 };

struct Shape {
  Kind kind;
  int64_t steps, batch, inputs, features;
  bool operator<(const Shape& other) const {
    return std::tie(kind, steps, batch, inputs, features) <
           std::tie(other.kind, other.steps, other.batch, other.inputs,
                    other.features);
  }
  bool lstm() const { return kind == Kind::kLstm; }
  // Gate blocks of the weights, and of the bias: oneDNN's linear-before-
  // reset GRU has a fourth bias block, the recurrent bias of c~.
  int64_t gates() const { return lstm() ? 4 : 3; }
  int64_t bias_gates() const { return 4; }
};

memory::desc Desc(const memory::dims& dims, Tag tag) {
  return memory::desc(dims, memory::data_type::f32, tag);
}

// The memory descriptors of one shape, in the user's layouts (`any` for the
// weights, so that the primitive picks its own). The carry `c` is an empty
// descriptor for the GRU.
struct Descs {
  memory::desc x, h, c, w_i, w_h, b, y, w_i_user, w_h_user;
  explicit Descs(const Shape& s)
      : x(Desc({s.steps, s.batch, s.inputs}, Tag::tnc)),
        h(Desc({1, 1, s.batch, s.features}, Tag::ldnc)),
        c(s.lstm() ? h : memory::desc()),
        w_i(Desc({1, 1, s.inputs, s.gates(), s.features}, Tag::any)),
        w_h(Desc({1, 1, s.features, s.gates(), s.features}, Tag::any)),
        b(Desc({1, 1, s.bias_gates(), s.features}, Tag::ldgo)),
        y(Desc({s.steps, s.batch, s.features}, Tag::tnc)),
        w_i_user(Desc({1, 1, s.inputs, s.gates(), s.features}, Tag::ldigo)),
        w_h_user(
            Desc({1, 1, s.features, s.gates(), s.features}, Tag::ldigo)) {}
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

constexpr auto kLeftToRight = dnnl::rnn_direction::unidirectional_left2right;

// The forward and backward primitive descriptors, through the base class
// both cells' descriptors derive from.
dnnl::rnn_primitive_desc_base ForwardDesc(const Shape& s,
                                          dnnl::prop_kind kind) {
  Descs d(s);
  if (s.lstm()) {
    return dnnl::lstm_forward::primitive_desc(
        Engine(), kind, kLeftToRight, d.x, d.h, d.c, d.w_i, d.w_h, d.b, d.y,
        d.h, d.c, UserScratchpad());
  }
  return dnnl::lbr_gru_forward::primitive_desc(
      Engine(), kind, kLeftToRight, d.x, d.h, d.w_i, d.w_h, d.b, d.y, d.h,
      UserScratchpad());
}

// The training primitives: the backward descriptor needs the forward one as
// a hint, in its own cell's type.
struct Training {
  dnnl::rnn_primitive_desc_base forward_pd, backward_pd;
  dnnl::primitive forward, backward;

  explicit Training(const Shape& s) {
    Descs d(s);
    constexpr auto kTraining = dnnl::prop_kind::forward_training;
    constexpr auto kBackward = dnnl::prop_kind::backward;
    if (s.lstm()) {
      dnnl::lstm_forward::primitive_desc hint(
          Engine(), kTraining, kLeftToRight, d.x, d.h, d.c, d.w_i, d.w_h,
          d.b, d.y, d.h, d.c, UserScratchpad());
      forward_pd = hint;
      backward_pd = dnnl::lstm_backward::primitive_desc(
          Engine(), kBackward, kLeftToRight, d.x, d.h, d.c, d.w_i, d.w_h,
          d.b, d.y, d.h, d.c, d.x, d.h, d.c, d.w_i, d.w_h, d.b, d.y, d.h, d.c,
          hint, UserScratchpad());
    } else {
      dnnl::lbr_gru_forward::primitive_desc hint(
          Engine(), kTraining, kLeftToRight, d.x, d.h, d.w_i, d.w_h, d.b,
          d.y, d.h, UserScratchpad());
      forward_pd = hint;
      backward_pd = dnnl::lbr_gru_backward::primitive_desc(
          Engine(), kBackward, kLeftToRight, d.x, d.h, d.w_i, d.w_h, d.b,
          d.y, d.h, d.x, d.h, d.w_i, d.w_h, d.b, d.y, d.h, hint,
          UserScratchpad());
    }
    forward = dnnl::primitive(forward_pd);
    backward = dnnl::primitive(backward_pd);
  }
};

struct Inference {
  dnnl::rnn_primitive_desc_base pd;
  dnnl::primitive primitive;
  explicit Inference(const Shape& s)
      : pd(ForwardDesc(s, dnnl::prop_kind::forward_inference)),
        primitive(pd) {}
};

// Primitives are built once per shape; executing one from several threads
// at once is safe with a scratchpad per call.
template <typename T>
const T& Cached(const Shape& shape) {
  static std::mutex mutex;
  static auto* cache = new std::map<Shape, std::unique_ptr<T>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = (*cache)[shape];
  if (!entry) entry = std::make_unique<T>(shape);
  return *entry;
}

memory Wrap(const memory::desc& desc, const void* data) {
  return memory(desc, Engine(), const_cast<void*>(data));
}

// ``user`` in the layout ``want``: itself, or a reordered copy in ``lease``.
memory InLayout(const memory& user, const memory::desc& want, Lease& lease,
                dnnl::stream& stream) {
  if (user.get_desc() == want) return user;
  lease = Lease(want.get_size());
  memory converted(want, Engine(), lease.data());
  memory source = user;
  dnnl::reorder(source, converted).execute(stream, source, converted);
  return converted;
}

Shape ShapeOf(Kind kind, const ffi::Buffer<ffi::F32>& x,
              const ffi::Buffer<ffi::F32>& w_h) {
  auto x_dims = x.dimensions();
  return Shape{kind, x_dims[0], x_dims[1], x_dims[2], w_h.dimensions()[0]};
}

template <typename F>
ffi::Error Guarded(F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("hk_rnn oneDNN RNN: ") +
                                e.what());
  }
}

// The arrays of one call; ``c``-pointers are null for the GRU.
struct Forward {
  const float *x, *w_i, *w_h, *b, *c_0, *h_0;
  float *y, *c_n, *h_n;
  void* workspace;  // null for inference
};

struct Backward {
  Forward forward;  // its outputs are the forward pass's, read here
  const float *d_y, *d_c_n, *d_h_n;
  float *d_x, *d_w_i, *d_w_h, *d_b, *d_c_0, *d_h_0;
  size_t bias_bytes;
};

// At most ``threads`` OpenMP threads for oneDNN's parallel regions started
// from this thread while it lives (0: leave OpenMP's setting). The setting
// is per thread in OpenMP, and restored: other work that runs on the same
// thread (XLA may run the call on the caller's) keeps its own.
class ThreadLimit {
 public:
  explicit ThreadLimit(int32_t threads) {
    if (threads > 0 && threads < omp_get_max_threads()) {
      previous_ = omp_get_max_threads();
      omp_set_num_threads(threads);
    }
  }
  ~ThreadLimit() {
    if (previous_ > 0) omp_set_num_threads(previous_);
  }

 private:
  int previous_ = 0;
};

void RunForward(const Shape& shape, const Forward& a) {
  const dnnl::rnn_primitive_desc_base* pd;
  const dnnl::primitive* primitive;
  if (a.workspace == nullptr) {
    const Inference& cached = Cached<Inference>(shape);
    pd = &cached.pd;
    primitive = &cached.primitive;
  } else {
    const Training& cached = Cached<Training>(shape);
    pd = &cached.forward_pd;
    primitive = &cached.forward;
  }
  Descs d(shape);
  dnnl::stream stream(Engine());
  Lease w_i_lease, w_h_lease;
  memory w_i = InLayout(Wrap(d.w_i_user, a.w_i), pd->weights_layer_desc(),
                        w_i_lease, stream);
  memory w_h = InLayout(Wrap(d.w_h_user, a.w_h), pd->weights_iter_desc(),
                        w_h_lease, stream);
  Lease scratchpad(pd->scratchpad_desc().get_size());
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SRC_LAYER, Wrap(d.x, a.x)},
      {DNNL_ARG_SRC_ITER, Wrap(d.h, a.h_0)},
      {DNNL_ARG_WEIGHTS_LAYER, w_i},
      {DNNL_ARG_WEIGHTS_ITER, w_h},
      {DNNL_ARG_BIAS, Wrap(d.b, a.b)},
      {DNNL_ARG_DST_LAYER, Wrap(d.y, a.y)},
      {DNNL_ARG_DST_ITER, Wrap(d.h, a.h_n)},
      {DNNL_ARG_SCRATCHPAD, Wrap(pd->scratchpad_desc(), scratchpad.data())},
  };
  if (shape.lstm()) {
    args.emplace(DNNL_ARG_SRC_ITER_C, Wrap(d.c, a.c_0));
    args.emplace(DNNL_ARG_DST_ITER_C, Wrap(d.c, a.c_n));
  }
  if (a.workspace != nullptr) {
    args.emplace(DNNL_ARG_WORKSPACE, Wrap(pd->workspace_desc(), a.workspace));
  }
  primitive->execute(stream, args);
  stream.wait();
}

void RunBackward(const Shape& shape, const Backward& a) {
  const Training& cached = Cached<Training>(shape);
  const auto& pd = cached.backward_pd;
  const Forward& f = a.forward;
  Descs d(shape);
  dnnl::stream stream(Engine());
  Lease w_i_lease, w_h_lease;
  memory w_i = InLayout(Wrap(d.w_i_user, f.w_i), pd.weights_layer_desc(),
                        w_i_lease, stream);
  memory w_h = InLayout(Wrap(d.w_h_user, f.w_h), pd.weights_iter_desc(),
                        w_h_lease, stream);
  // The weight gradients: straight into the outputs when the primitive
  // takes our layout, otherwise into a leased buffer reordered after.
  memory d_w_i_user = Wrap(d.w_i_user, a.d_w_i);
  memory d_w_h_user = Wrap(d.w_h_user, a.d_w_h);
  Lease d_w_i_lease, d_w_h_lease;
  auto gradient_memory = [&](const memory& user, const memory::desc& want,
                             Lease& lease) {
    if (user.get_desc() == want) return user;
    lease = Lease(want.get_size());
    return memory(want, Engine(), lease.data());
  };
  memory d_w_i =
      gradient_memory(d_w_i_user, pd.diff_weights_layer_desc(), d_w_i_lease);
  memory d_w_h =
      gradient_memory(d_w_h_user, pd.diff_weights_iter_desc(), d_w_h_lease);
  std::memset(d_w_i.get_data_handle(), 0, d_w_i.get_desc().get_size());
  std::memset(d_w_h.get_data_handle(), 0, d_w_h.get_desc().get_size());
  std::memset(a.d_b, 0, a.bias_bytes);
  Lease scratchpad(pd.scratchpad_desc().get_size());
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SRC_LAYER, Wrap(d.x, f.x)},
      {DNNL_ARG_SRC_ITER, Wrap(d.h, f.h_0)},
      {DNNL_ARG_WEIGHTS_LAYER, w_i},
      {DNNL_ARG_WEIGHTS_ITER, w_h},
      {DNNL_ARG_BIAS, Wrap(d.b, f.b)},
      {DNNL_ARG_DST_LAYER, Wrap(d.y, f.y)},
      {DNNL_ARG_DST_ITER, Wrap(d.h, f.h_n)},
      {DNNL_ARG_WORKSPACE, Wrap(pd.workspace_desc(), f.workspace)},
      {DNNL_ARG_DIFF_DST_LAYER, Wrap(d.y, a.d_y)},
      {DNNL_ARG_DIFF_DST_ITER, Wrap(d.h, a.d_h_n)},
      {DNNL_ARG_DIFF_SRC_LAYER, Wrap(d.x, a.d_x)},
      {DNNL_ARG_DIFF_SRC_ITER, Wrap(d.h, a.d_h_0)},
      {DNNL_ARG_DIFF_WEIGHTS_LAYER, d_w_i},
      {DNNL_ARG_DIFF_WEIGHTS_ITER, d_w_h},
      {DNNL_ARG_DIFF_BIAS, Wrap(d.b, a.d_b)},
      {DNNL_ARG_SCRATCHPAD, Wrap(pd.scratchpad_desc(), scratchpad.data())},
  };
  if (shape.lstm()) {
    args.emplace(DNNL_ARG_SRC_ITER_C, Wrap(d.c, f.c_0));
    args.emplace(DNNL_ARG_DST_ITER_C, Wrap(d.c, f.c_n));
    args.emplace(DNNL_ARG_DIFF_DST_ITER_C, Wrap(d.c, a.d_c_n));
    args.emplace(DNNL_ARG_DIFF_SRC_ITER_C, Wrap(d.c, a.d_c_0));
  }
  cached.backward.execute(stream, args);
  if (d_w_i != d_w_i_user) {
    dnnl::reorder(d_w_i, d_w_i_user).execute(stream, d_w_i, d_w_i_user);
  }
  if (d_w_h != d_w_h_user) {
    dnnl::reorder(d_w_h, d_w_h_user).execute(stream, d_w_h, d_w_h_user);
  }
  stream.wait();
}

void CheckWorkspace(const Shape& shape, size_t bytes) {
  if (bytes != Cached<Training>(shape).forward_pd.workspace_desc().get_size())
    throw std::runtime_error("workspace size does not match the primitive");
}

using In = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;
using Bytes = ffi::ResultBuffer<ffi::U8>;

ffi::Error LstmInference(In x, In w_i, In w_h, In b, In c_0, In h_0,
                         int32_t threads, Out y,
                         Out c_n, Out h_n) {
  return Guarded([&] {
    ThreadLimit limit(threads);
    RunForward(ShapeOf(Kind::kLstm, x, w_h),
               {x.typed_data(), w_i.typed_data(), w_h.typed_data(),
                b.typed_data(), c_0.typed_data(), h_0.typed_data(),
                y->typed_data(), c_n->typed_data(), h_n->typed_data(),
                nullptr});
  });
}

ffi::Error LstmForward(In x, In w_i, In w_h, In b, In c_0, In h_0,
                       int32_t threads, Out y,
                       Out c_n, Out h_n, Bytes workspace) {
  return Guarded([&] {
    ThreadLimit limit(threads);
    Shape shape = ShapeOf(Kind::kLstm, x, w_h);
    CheckWorkspace(shape, workspace->size_bytes());
    RunForward(shape, {x.typed_data(), w_i.typed_data(), w_h.typed_data(),
                       b.typed_data(), c_0.typed_data(), h_0.typed_data(),
                       y->typed_data(), c_n->typed_data(), h_n->typed_data(),
                       workspace->untyped_data()});
  });
}

ffi::Error LstmBackward(In x, In w_i, In w_h, In b, In c_0, In h_0, In y,
                        In c_n, In h_n, ffi::Buffer<ffi::U8> workspace,
                        In d_y, In d_c_n, In d_h_n, int32_t threads,
                        Out d_x, Out d_w_i,
                        Out d_w_h, Out d_b, Out d_c_0, Out d_h_0) {
  return Guarded([&] {
    ThreadLimit limit(threads);
    Forward forward{x.typed_data(),   w_i.typed_data(), w_h.typed_data(),
                    b.typed_data(),   c_0.typed_data(), h_0.typed_data(),
                    y.typed_data(),   c_n.typed_data(), h_n.typed_data(),
                    workspace.untyped_data()};
    RunBackward(ShapeOf(Kind::kLstm, x, w_h),
                {forward, d_y.typed_data(), d_c_n.typed_data(),
                 d_h_n.typed_data(), d_x->typed_data(), d_w_i->typed_data(),
                 d_w_h->typed_data(), d_b->typed_data(), d_c_0->typed_data(),
                 d_h_0->typed_data(), d_b->size_bytes()});
  });
}

// The GRU takes its bias in oneDNN's four blocks (u, r, c~, then c~'s
// recurrent bias) and its weights in blocks u, r, c~; the Python side maps
// hk_rnn's r, z, n blocks and two biases onto these.

ffi::Error GruInference(In x, In w_i, In w_h, In b, In h_0, int32_t threads,
                        Out y, Out h_n) {
  return Guarded([&] {
    ThreadLimit limit(threads);
    RunForward(ShapeOf(Kind::kGru, x, w_h),
               {x.typed_data(), w_i.typed_data(), w_h.typed_data(),
                b.typed_data(), nullptr, h_0.typed_data(), y->typed_data(),
                nullptr, h_n->typed_data(), nullptr});
  });
}

ffi::Error GruForward(In x, In w_i, In w_h, In b, In h_0, int32_t threads,
                      Out y, Out h_n,
                      Bytes workspace) {
  return Guarded([&] {
    ThreadLimit limit(threads);
    Shape shape = ShapeOf(Kind::kGru, x, w_h);
    CheckWorkspace(shape, workspace->size_bytes());
    RunForward(shape, {x.typed_data(), w_i.typed_data(), w_h.typed_data(),
                       b.typed_data(), nullptr, h_0.typed_data(),
                       y->typed_data(), nullptr, h_n->typed_data(),
                       workspace->untyped_data()});
  });
}

ffi::Error GruBackward(In x, In w_i, In w_h, In b, In h_0, In y, In h_n,
                       ffi::Buffer<ffi::U8> workspace, In d_y, In d_h_n,
                       int32_t threads,
                       Out d_x, Out d_w_i, Out d_w_h, Out d_b, Out d_h_0) {
  return Guarded([&] {
    ThreadLimit limit(threads);
    Forward forward{x.typed_data(), w_i.typed_data(), w_h.typed_data(),
                    b.typed_data(), nullptr,          h_0.typed_data(),
                    y.typed_data(), nullptr,          h_n.typed_data(),
                    workspace.untyped_data()};
    RunBackward(ShapeOf(Kind::kGru, x, w_h),
                {forward, d_y.typed_data(), nullptr, d_h_n.typed_data(),
                 d_x->typed_data(), d_w_i->typed_data(), d_w_h->typed_data(),
                 d_b->typed_data(), nullptr, d_h_0->typed_data(),
                 d_b->size_bytes()});
  });
}

}  // namespace

// Declared first to give the handlers default visibility.
extern "C" {
HK_RNN_EXPORT XLA_FFI_Error* HkRnnLstmInference(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnLstmForward(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnLstmBackward(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnGruInference(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnGruForward(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnGruBackward(XLA_FFI_CallFrame* frame);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HkRnnLstmInference, LstmInference,
    ffi::Ffi::Bind()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Attr<int32_t>("threads")
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HkRnnLstmForward, LstmForward,
    ffi::Ffi::Bind()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Attr<int32_t>("threads")
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::U8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HkRnnLstmBackward, LstmBackward,
    ffi::Ffi::Bind()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<ffi::Buffer<ffi::U8>>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Attr<int32_t>("threads")
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HkRnnGruInference, GruInference,
    ffi::Ffi::Bind()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Attr<int32_t>("threads")
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HkRnnGruForward, GruForward,
    ffi::Ffi::Bind()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Attr<int32_t>("threads")
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::U8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HkRnnGruBackward, GruBackward,
    ffi::Ffi::Bind()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<In>()
    .Arg<ffi::Buffer<ffi::U8>>()
    .Arg<In>()
    .Arg<In>()
    .Attr<int32_t>("threads")
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>()
    .Ret<ffi::Buffer<ffi::F32>>());

// Plain C entry points for ctypes.

// Builds (and caches) the inference and training primitives of a shape
// (``kind`` 0: LSTM, 1: GRU) and returns the training workspace's size in
// bytes, or -1 if oneDNN cannot build them (the message goes to ``error``).
extern "C" HK_RNN_EXPORT int64_t hk_rnn_prepare(int kind, int64_t steps,
                                                int64_t batch, int64_t inputs,
                                                int64_t features, char* error,
                                                size_t error_size) {
  try {
    if (kind != 0 && kind != 1) throw std::invalid_argument("unknown kind");
    Shape shape{static_cast<Kind>(kind), steps, batch, inputs, features};
    Cached<Inference>(shape);
    const Training& cached = Cached<Training>(shape);
    return static_cast<int64_t>(cached.forward_pd.workspace_desc().get_size());
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return -1;
  }
}

// 0 when oneDNN's CPU engine works here, else -1 with the message in
// ``error``; ``version`` receives oneDNN's version, e.g. "3.2.0".
extern "C" HK_RNN_EXPORT int hk_rnn_onednn_check(char* version,
                                                 size_t version_size,
                                                 char* error,
                                                 size_t error_size) {
  const dnnl_version_t* v = dnnl_version();
  std::snprintf(version, version_size, "%d.%d.%d", v->major, v->minor,
                v->patch);
  try {
    Engine();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return -1;
  }
}
