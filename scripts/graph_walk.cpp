// A lazy MLX graph, written out node by node without evaluating it (scripts/kernel_profile.py census).
// MLX's Python API exposes no inputs of an array and export_function cannot serialise custom
// functions, so this reads the C++ arrays behind mx.array objects: only inline accessors and
// virtual calls of the installed headers, nothing evaluated or modified.
#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_set>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

using namespace mlx::core;

template <typename V>
static void write_list(FILE* f, const V& v) {
  std::fputc('[', f);
  for (size_t i = 0; i < v.size(); ++i) std::fprintf(f, i ? ",%lld" : "%lld", (long long)v[i]);
  std::fputc(']', f);
}

// One JSON line per primitive node: outputs (id, shape, dtype size), inputs (ids), view arguments.
extern "C" int graph_walk(void** arrays, int n, const char* path) {
  FILE* f = std::fopen(path, "w");
  if (!f) return -1;
  std::unordered_set<std::uintptr_t> seen;
  std::vector<const array*> stack;
  for (int i = 0; i < n; ++i) stack.push_back(static_cast<const array*>(arrays[i]));
  std::fprintf(f, "{\"roots\":");
  std::vector<long long> roots;
  for (int i = 0; i < n; ++i) roots.push_back((long long)static_cast<const array*>(arrays[i])->id());
  write_list(f, roots);
  std::fprintf(f, "}\n");
  int count = 0;
  while (!stack.empty()) {
    const array* a = stack.back();
    stack.pop_back();
    if (!seen.insert(a->id()).second) continue;
    if (!a->has_primitive()) {
      std::fprintf(f, "{\"id\":%lld,\"leaf\":1,\"shape\":", (long long)a->id());
      write_list(f, a->shape());
      std::fprintf(f, ",\"itemsize\":%d", (int)a->itemsize());
      if (a->status() != array::Status::unscheduled) {  // evaluated: its real layout (a view's strides)
        std::fprintf(f, ",\"strides\":");
        write_list(f, a->strides());
      }
      std::fprintf(f, "}\n");
      continue;
    }
    auto outs = a->outputs();
    for (auto& o : outs) seen.insert(o.id());
    Primitive& p = a->primitive();
    std::string name = p.name();
    std::fprintf(f, "{\"name\":\"%s\",\"outputs\":[", name.c_str());
    for (size_t i = 0; i < outs.size(); ++i) {
      std::fprintf(f, i ? ",[%lld," : "[%lld,", (long long)outs[i].id());
      write_list(f, outs[i].shape());
      std::fprintf(f, ",%d]", (int)outs[i].itemsize());
    }
    std::fprintf(f, "],\"inputs\":");
    std::vector<long long> ins;
    for (auto& in : a->inputs()) ins.push_back((long long)in.id());
    write_list(f, ins);
    if (name == "Transpose") {
      std::fprintf(f, ",\"axes\":");
      write_list(f, static_cast<Transpose&>(p).state());
    } else if (name == "Slice") {
      auto [s, e, st] = static_cast<Slice&>(p).state();
      std::fprintf(f, ",\"start\":");
      write_list(f, s);
      std::fprintf(f, ",\"stop\":");
      write_list(f, e);
      std::fprintf(f, ",\"step\":");
      write_list(f, st);
    }
    std::fprintf(f, "}\n");
    ++count;
    for (auto& in : a->inputs()) stack.push_back(&in);
  }
  std::fclose(f);
  return count;
}

// The element count of the array behind a pointer: graph_census checks it against Python's before
// walking, so a pointer read through another MLX's object layout fails with a message, not a crash.
extern "C" long long array_size(void* p) { return (long long)static_cast<const array*>(p)->size(); }
