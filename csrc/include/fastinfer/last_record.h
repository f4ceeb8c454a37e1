// The last value a launcher recorded (a launch's plan), for fastinfer._C to read back: written by any
// host thread, read under the same lock. Host-only.
#pragma once
#include <mutex>

namespace fastinfer {

template <typename T>
class LastRecord {
 public:
  void set(const T& value) {
    const std::lock_guard<std::mutex> lock(mutex_);
    value_ = value;
  }
  T get() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return value_;
  }

 private:
  std::mutex mutex_;
  T value_{};
};

}  // namespace fastinfer
