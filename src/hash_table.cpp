// CPU hash table behind spconv.pytorch.hash.HashTable (torch.classes.spconv.HashTable).
//
// Keys int32/int64, values of any 4- or 8-byte dtype (stored as raw bits). Entries are kept in
// insertion order, so items() and assign_arange_() are deterministic: the i-th distinct key ever
// inserted is item i. Inserting an existing key keeps its first value (spconv's CPU table,
// tsl::robin_map::insert, does the same). With max_size > 0 the table holds at most max_size
// keys; an insert that would pass it raises ValueError and leaves the table unchanged.
//
// Thread-safe: one table may be used from several Python threads (the ops release the GIL). Writers
// (insert, insert_exist_keys, assign_arange_, clear) hold the table's lock exclusively, readers (query,
// items, size) share it, so a query never sees a half-rebuilt table and finds every key inserted before it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <tuple>
#include <vector>

#include "spconv/hash_mix.h"

namespace spconv {
namespace {

const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    default: return c10::toString(t);
  }
}

class HashTableCPU : public torch::CustomClassHolder {
 public:
  HashTableCPU(c10::ScalarType key_dtype, c10::ScalarType value_dtype, int64_t max_size)
      : key_dtype_(key_dtype), value_dtype_(value_dtype), max_size_(max_size) {
    TORCH_CHECK_VALUE(key_dtype == at::kInt || key_dtype == at::kLong,
                      "HashTable: key_dtype must be torch.int32 or torch.int64, got ", dtype_name(key_dtype));
    TORCH_CHECK_VALUE(value_dtype == at::kInt || value_dtype == at::kLong || value_dtype == at::kFloat ||
                          value_dtype == at::kDouble,
                      "HashTable: value_dtype must have itemsize 4 or 8 (torch.int32, torch.int64, torch.float32, "
                      "torch.float64), got ",
                      dtype_name(value_dtype));
    rebuild(16);
  }

  // Inserts keys absent from the table (values default to 0); existing keys keep their value.
  void insert(const at::Tensor& keys_in, const std::optional<at::Tensor>& values_in) {
    at::Tensor keys = check_keys(keys_in, "insert");
    at::Tensor values;
    if (values_in.has_value()) values = check_values(*values_in, keys.size(0), "insert");
    std::unique_lock<std::shared_mutex> lock(mu_);
    const int64_t n = keys.size(0), old_size = count();
    if (max_size_ <= 0 && (count() + n) * 2 > capacity()) grow_for(count() + n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t key = key_at(keys, i);
      if (max_size_ > 0 && count() >= max_size_ && find(key) < 0) {
        keys_.resize(old_size);
        values_.resize(old_size);
        rebuild(capacity());
        TORCH_CHECK_VALUE(false, "HashTable.insert: the table is full (max_size=", max_size_, " keys, ", old_size,
                          " already in it); nothing was inserted: create the table with a larger max_size, or "
                          "max_size=-1 for a table that grows");
      }
      if (max_size_ > 0 && (count() + 1) * 2 > capacity()) grow_for(count() + 1);
      bool inserted;
      const int64_t e = find_or_insert(key, &inserted);
      if (inserted) values_[e] = values.defined() ? value_bits_at(values, i) : 0;
    }
  }

  // (values, is_empty): values of the keys; missing keys leave `values` unchanged (0 in a new tensor).
  std::tuple<at::Tensor, at::Tensor> query(const at::Tensor& keys_in, const std::optional<at::Tensor>& values_in) {
    at::Tensor keys = check_keys(keys_in, "query");
    const int64_t n = keys.size(0);
    at::Tensor values;
    if (values_in.has_value()) {
      values = check_values(*values_in, n, "query");
      TORCH_CHECK_VALUE(values.is_same(*values_in), "HashTable.query: values must be a contiguous tensor");
    } else {
      values = at::zeros({n}, keys.options().dtype(value_dtype_));
    }
    at::Tensor is_empty = at::empty({n}, keys.options().dtype(at::kBool));
    bool* emp = is_empty.data_ptr<bool>();
    std::shared_lock<std::shared_mutex> lock(mu_);
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t e = find(key_at(keys, i));
        emp[i] = e < 0;
        if (e >= 0) set_value_bits(values, i, values_[e]);
      }
    });
    return {values, is_empty};
  }

  // Sets the values of keys already in the table; returns uint8 [N], 1 where the key was absent.
  at::Tensor insert_exist_keys(const at::Tensor& keys_in, const at::Tensor& values_in) {
    at::Tensor keys = check_keys(keys_in, "insert_exist_keys");
    at::Tensor values = check_values(values_in, keys.size(0), "insert_exist_keys");
    const int64_t n = keys.size(0);
    at::Tensor is_empty = at::empty({n}, keys.options().dtype(at::kByte));
    uint8_t* emp = is_empty.data_ptr<uint8_t>();
    std::unique_lock<std::shared_mutex> lock(mu_);
    // Sequential: with a key repeated in `keys`, the last value wins, independent of threads.
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = find(key_at(keys, i));
      emp[i] = e < 0;
      if (e >= 0) values_[e] = value_bits_at(values, i);
    }
    return is_empty;
  }

  // values = 0..size-1 in insertion order; returns size.
  int64_t assign_arange_() {
    TORCH_CHECK_VALUE(value_dtype_ == at::kInt || value_dtype_ == at::kLong,
                      "HashTable.assign_arange_: value_dtype must be torch.int32 or torch.int64, got ", dtype_name(value_dtype_));
    std::unique_lock<std::shared_mutex> lock(mu_);
    for (int64_t i = 0; i < count(); ++i) values_[i] = value_dtype_ == at::kInt ? int64_t(uint32_t(i)) : i;
    return count();
  }

  // (keys, values) of every entry, in insertion order.
  std::tuple<at::Tensor, at::Tensor> items() {
    std::shared_lock<std::shared_mutex> lock(mu_);
    const int64_t n = count();
    at::Tensor keys = at::empty({n}, at::TensorOptions().dtype(key_dtype_));
    at::Tensor values = at::empty({n}, at::TensorOptions().dtype(value_dtype_));
    for (int64_t i = 0; i < n; ++i) {
      if (key_dtype_ == at::kInt) {
        keys.data_ptr<int32_t>()[i] = static_cast<int32_t>(keys_[i]);
      } else {
        keys.data_ptr<int64_t>()[i] = keys_[i];
      }
      set_value_bits(values, i, values_[i]);
    }
    return {keys, values};
  }

  int64_t size() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return count();
  }
  void clear() {
    std::unique_lock<std::shared_mutex> lock(mu_);
    keys_.clear();
    values_.clear();
    rebuild(16);
  }

 private:
  struct Slot {
    int64_t key;
    int64_t entry;  // index into keys_/values_, -1 when empty
  };

  int64_t capacity() const { return mask_ + 1; }
  int64_t count() const { return static_cast<int64_t>(keys_.size()); }  // with mu_ held

  at::Tensor check_keys(const at::Tensor& keys, const char* fn) const {
    TORCH_CHECK_VALUE(keys.device().is_cpu(), "HashTable.", fn, ": keys must be on the CPU, got ", keys.device());
    TORCH_CHECK_VALUE(keys.dim() == 1, "HashTable.", fn, ": keys must be 1-D [N], got shape ", keys.sizes());
    TORCH_CHECK_VALUE(keys.scalar_type() == key_dtype_, "HashTable.", fn, ": keys must be ", dtype_name(key_dtype_),
                      " (the table's key_dtype), got ", dtype_name(keys.scalar_type()));
    return keys.contiguous();
  }

  at::Tensor check_values(const at::Tensor& values, int64_t n, const char* fn) const {
    TORCH_CHECK_VALUE(values.device().is_cpu(), "HashTable.", fn, ": values must be on the CPU, got ",
                      values.device());
    TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == n, "HashTable.", fn, ": values must be 1-D with one "
                      "entry per key (", n, " keys), got shape ", values.sizes());
    TORCH_CHECK_VALUE(values.scalar_type() == value_dtype_, "HashTable.", fn, ": values must be ", dtype_name(value_dtype_),
                      " (the table's value_dtype), got ", dtype_name(values.scalar_type()));
    return values.contiguous();
  }

  int64_t key_at(const at::Tensor& keys, int64_t i) const {
    return key_dtype_ == at::kInt ? int64_t(keys.const_data_ptr<int32_t>()[i]) : keys.const_data_ptr<int64_t>()[i];
  }

  int64_t value_bits_at(const at::Tensor& values, int64_t i) const {
    if (values.element_size() == 4) {
      uint32_t b;
      std::memcpy(&b, static_cast<const char*>(values.const_data_ptr()) + 4 * i, 4);
      return int64_t(b);
    }
    int64_t b;
    std::memcpy(&b, static_cast<const char*>(values.const_data_ptr()) + 8 * i, 8);
    return b;
  }

  void set_value_bits(at::Tensor& values, int64_t i, int64_t bits) const {
    if (values.element_size() == 4) {
      uint32_t b = static_cast<uint32_t>(bits);
      std::memcpy(static_cast<char*>(values.data_ptr()) + 4 * i, &b, 4);
    } else {
      std::memcpy(static_cast<char*>(values.data_ptr()) + 8 * i, &bits, 8);
    }
  }

  int64_t find(int64_t key) const {
    int64_t s = mix64(static_cast<uint64_t>(key)) & mask_;
    while (true) {
      const Slot& slot = slots_[s];
      if (slot.entry < 0) return -1;
      if (slot.key == key) return slot.entry;
      s = (s + 1) & mask_;
    }
  }

  int64_t find_or_insert(int64_t key, bool* inserted) {
    int64_t s = mix64(static_cast<uint64_t>(key)) & mask_;
    while (true) {
      Slot& slot = slots_[s];
      if (slot.entry < 0) {
        slot.key = key;
        slot.entry = count();
        keys_.push_back(key);
        values_.push_back(0);
        *inserted = true;
        return slot.entry;
      }
      if (slot.key == key) {
        *inserted = false;
        return slot.entry;
      }
      s = (s + 1) & mask_;
    }
  }

  void grow_for(int64_t count) {
    int64_t cap = capacity();
    while (cap < count * 2) cap <<= 1;
    if (cap != capacity()) rebuild(cap);
  }

  void rebuild(int64_t cap) {
    mask_ = cap - 1;
    slots_.assign(cap, Slot{0, -1});
    for (int64_t e = 0; e < count(); ++e) {
      int64_t s = mix64(static_cast<uint64_t>(keys_[e])) & mask_;
      while (slots_[s].entry >= 0) s = (s + 1) & mask_;
      slots_[s] = Slot{keys_[e], e};
    }
  }

  mutable std::shared_mutex mu_;  // see the top of the file
  c10::ScalarType key_dtype_, value_dtype_;
  int64_t max_size_;
  int64_t mask_ = 0;
  std::vector<Slot> slots_;
  std::vector<int64_t> keys_, values_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(spconv, m) {
  m.class_<HashTableCPU>("HashTable")
      .def(torch::init<c10::ScalarType, c10::ScalarType, int64_t>())
      .def("insert", &HashTableCPU::insert)
      .def("query", &HashTableCPU::query)
      .def("insert_exist_keys", &HashTableCPU::insert_exist_keys)
      .def("assign_arange_", &HashTableCPU::assign_arange_)
      .def("items", &HashTableCPU::items)
      .def("size", &HashTableCPU::size)
      .def("clear", &HashTableCPU::clear);
}

}  // namespace spconv
