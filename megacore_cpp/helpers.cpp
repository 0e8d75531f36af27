// Dataset index helpers for megacore.datasets, compiled with pybind11.
//
// Why C++: these are sequential walks over every document (sample index) or every sample
// (blending indices) of a training run. For a 1e8-token corpus a Python loop takes tens of
// seconds; these loops take milliseconds. Semantics follow Megatron-LM's helpers (see
// shared/FORMATS.md section 4) so index caches built here equal Megatron's byte for byte;
// megacore/datasets/helpers.py holds slow numpy references that the tests compare against.
//
// Errors are raised as std::invalid_argument / std::out_of_range, which pybind11 turns into
// Python ValueError / IndexError, instead of Megatron's asserts (compiled out under NDEBUG,
// which turns a bad input into an out-of-bounds read).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Number of samples the token stream yields: every sample needs seq_length + extra tokens
// but advances by seq_length only (samples overlap by `extra` tokens, the label shift).
int64_t count_samples(int64_t total_tokens, int32_t seq_length, int extra, bool drop_last) {
  const int64_t usable = total_tokens - extra;
  if (drop_last) {
    return usable / seq_length;
  }
  // Megatron rounds up in single precision; keep that so caches stay interchangeable.
  return static_cast<int64_t>(std::ceil(static_cast<float>(usable) / seq_length));
}

// Fills out[0 .. 2*(num_samples+1)) with (document_idx position, token offset) pairs.
// Runs without the GIL: it only touches raw buffers.
template <typename T>
void walk_samples(const int32_t* sizes, int64_t num_sizes, const int32_t* document_idx,
                  int64_t num_docs, int32_t seq_length, int extra, int64_t num_samples,
                  T* out) {
  int64_t doc_pos = 0;   // index into document_idx
  int64_t offset = 0;    // token offset inside that document
  out[0] = 0;
  out[1] = 0;
  for (int64_t k = 1; k <= num_samples; ++k) {
    int64_t needed = static_cast<int64_t>(seq_length) + extra;
    while (true) {
      const int32_t doc = document_idx[doc_pos];
      if (doc < 0 || doc >= num_sizes) {
        throw std::out_of_range("build_sample_idx: document_idx[" + std::to_string(doc_pos) +
                                "] = " + std::to_string(doc) + " is outside sizes (length " +
                                std::to_string(num_sizes) + ")");
      }
      const int64_t left_in_doc = static_cast<int64_t>(sizes[doc]) - offset;
      if (needed <= left_in_doc) {
        // The sample ends inside this document (possibly exactly at its end, in which case
        // the next sample starts `extra` tokens before the end of this same document).
        offset += needed - extra;
        break;
      }
      needed -= left_in_doc;
      if (doc_pos + 1 == num_docs) {
        // Out of tokens: only the final, partial sample (kept when not dropping) may do this.
        if (k != num_samples) {
          throw std::invalid_argument(
              "build_sample_idx: the documents hold fewer tokens than num_epochs * "
              "tokens_per_epoch says (ran out at sample " + std::to_string(k - 1) + ")");
        }
        offset = static_cast<int64_t>(sizes[doc]) - extra;
        break;
      }
      ++doc_pos;
      offset = 0;
    }
    out[2 * k] = static_cast<T>(doc_pos);
    out[2 * k + 1] = static_cast<T>(offset);
  }
}

template <typename T>
py::array_t<T> build_sample_idx(const Int32Array& sizes, const Int32Array& document_idx,
                                int32_t seq_length, int32_t num_epochs,
                                int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                                int add_extra_token_to_sequence) {
  if (sizes.ndim() != 1 || document_idx.ndim() != 1) {
    throw std::invalid_argument("build_sample_idx: sizes and document_idx must be 1-D");
  }
  if (seq_length <= 0 || num_epochs <= 0 || tokens_per_epoch <= 0) {
    throw std::invalid_argument(
        "build_sample_idx: seq_length, num_epochs and tokens_per_epoch must be positive");
  }
  if (add_extra_token_to_sequence < 0) {
    throw std::invalid_argument("build_sample_idx: add_extra_token_to_sequence must be >= 0");
  }
  const int64_t num_docs = document_idx.shape(0);
  const int64_t total_tokens = static_cast<int64_t>(num_epochs) * tokens_per_epoch;
  const int64_t num_samples = count_samples(total_tokens, seq_length,
                                            add_extra_token_to_sequence,
                                            drop_last_partial_sequence);
  if (num_samples < 0) {
    throw std::invalid_argument("build_sample_idx: fewer tokens than one extra token");
  }
  if (num_samples > 0 && num_docs == 0) {
    throw std::invalid_argument("build_sample_idx: document_idx is empty");
  }
  py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
  T* out = result.mutable_data();
  const int32_t* sizes_ptr = sizes.data();
  const int32_t* doc_ptr = document_idx.data();
  const int64_t num_sizes = sizes.shape(0);
  {
    py::gil_scoped_release release;
    walk_samples<T>(sizes_ptr, num_sizes, doc_ptr, num_docs, seq_length,
                    add_extra_token_to_sequence, num_samples, out);
  }
  return result;
}

// Index of the dataset furthest behind its target share at position `s`; ties go to the
// lowest index because only a strictly larger error replaces the current best.
int32_t most_behind(const double* weights, const std::vector<int64_t>& taken,
                    const std::vector<char>& candidate, int64_t s) {
  const double x = std::max(static_cast<double>(s), 1.0);
  int32_t best = -1;
  double best_error = std::numeric_limits<double>::lowest();
  for (size_t d = 0; d < taken.size(); ++d) {
    if (!candidate[d]) continue;
    const double error = weights[d] * x - static_cast<double>(taken[d]);
    if (best < 0 || error > best_error) {
      best = static_cast<int32_t>(d);
      best_error = error;
    }
  }
  return best;
}

// The outputs are filled in place, so they must already be exactly the right numpy arrays:
// a silent conversion would fill a temporary copy and leave the caller's arrays untouched.
template <typename T>
T* output_buffer(py::array& array, int64_t size, const char* name) {
  if (!array.dtype().is(py::dtype::of<T>())) {
    throw std::invalid_argument(std::string("blending indices: ") + name + " has dtype " +
                                std::string(py::str(array.dtype())) + ", expected " +
                                std::string(py::str(py::dtype::of<T>())));
  }
  if (array.ndim() != 1 || array.shape(0) < size || !(array.flags() & py::array::c_style) ||
      !array.writeable()) {
    throw std::invalid_argument(std::string("blending indices: ") + name +
                                " must be a writeable, contiguous 1-D array of at least " +
                                std::to_string(size) + " elements");
  }
  return static_cast<T*>(array.mutable_data());
}

void build_blending_indices(py::array dataset_index, py::array dataset_sample_index,
                            const DoubleArray& weights, int32_t num_datasets, int64_t size,
                            bool verbose) {
  if (num_datasets <= 0 || weights.ndim() != 1 || weights.shape(0) < num_datasets) {
    throw std::invalid_argument("build_blending_indices: need num_datasets > 0 weights");
  }
  if (num_datasets > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("blending indices: at most 32767 datasets (int16 index)");
  }
  int16_t* index_out = output_buffer<int16_t>(dataset_index, size, "dataset_index");
  int64_t* sample_out = output_buffer<int64_t>(dataset_sample_index, size, "dataset_sample_index");
  const double* w = weights.data();
  std::vector<int64_t> taken(num_datasets, 0);
  const std::vector<char> candidate(num_datasets, 1);
  {
    py::gil_scoped_release release;
    for (int64_t s = 0; s < size; ++s) {
      const int32_t d = most_behind(w, taken, candidate, s);
      index_out[s] = static_cast<int16_t>(d);
      sample_out[s] = taken[d];
      ++taken[d];
    }
  }
  if (verbose) {
    for (int32_t d = 0; d < num_datasets; ++d) {
      const double achieved = size > 0 ? static_cast<double>(taken[d]) / size : 0.0;
      py::print("  dataset", d, "weight", w[d], "achieved", achieved);
    }
  }
}

void build_exhaustive_blending_indices(py::array dataset_index, py::array dataset_sample_index,
                                       const Int64Array& sizes, int32_t num_datasets) {
  if (num_datasets <= 0 || sizes.ndim() != 1 || sizes.shape(0) < num_datasets) {
    throw std::invalid_argument("build_exhaustive_blending_indices: need num_datasets sizes");
  }
  if (num_datasets > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("blending indices: at most 32767 datasets (int16 index)");
  }
  const int64_t* sizes_ptr = sizes.data();
  int64_t total = 0;
  for (int32_t d = 0; d < num_datasets; ++d) {
    if (sizes_ptr[d] < 0) {
      throw std::invalid_argument("build_exhaustive_blending_indices: negative size");
    }
    total += sizes_ptr[d];
  }
  int16_t* index_out = output_buffer<int16_t>(dataset_index, total, "dataset_index");
  int64_t* sample_out = output_buffer<int64_t>(dataset_sample_index, total, "dataset_sample_index");
  std::vector<double> weights(num_datasets);
  std::vector<char> candidate(num_datasets);
  for (int32_t d = 0; d < num_datasets; ++d) {
    weights[d] = sizes_ptr[d] / static_cast<double>(total);
    // An empty dataset is never a candidate (Megatron lets it win ties before it is
    // retired, which hands out a sample that does not exist).
    candidate[d] = sizes_ptr[d] > 0;
  }
  std::vector<int64_t> taken(num_datasets, 0);
  py::gil_scoped_release release;
  for (int64_t s = 0; s < total; ++s) {
    const int32_t d = most_behind(weights.data(), taken, candidate, s);
    index_out[s] = static_cast<int16_t>(d);
    sample_out[s] = taken[d];
    if (++taken[d] == sizes_ptr[d]) candidate[d] = 0;
  }
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "megacore dataset index helpers (sample index, blending indices)";
  const char* sample_doc =
      "build_sample_idx(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, "
      "drop_last_partial_sequence=True, add_extra_token_to_sequence=1) -> [num_samples+1, 2]";
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, sample_doc, py::arg("sizes"),
        py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = 1);
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, sample_doc, py::arg("sizes"),
        py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = 1);
  m.def("build_blending_indices", &build_blending_indices,
        "Fill dataset_index/dataset_sample_index in place by greedy proportional "
        "interleaving", py::arg("dataset_index"), py::arg("dataset_sample_index"),
        py::arg("weights"), py::arg("num_datasets"), py::arg("size"), py::arg("verbose"));
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices,
        "Like build_blending_indices but takes exactly sizes[d] samples from dataset d",
        py::arg("dataset_index"), py::arg("dataset_sample_index"), py::arg("sizes"),
        py::arg("num_datasets"));
}
