// Plain-text tables and byte/time formatting for mq-client's human output.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mq::client {

class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  // Columns padded to their widest cell, two spaces apart, header first.
  std::string Render() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// "1.50 GiB", "12.0 MiB", "512 B".
std::string Bytes(int64_t bytes);
// "2026-11-26 10:20:51" (UTC) or "-" for 0.
std::string Time(int64_t ms);
// "3.2s", "5m07s", "2h03m".
std::string Duration(int64_t ms);

}  // namespace mq::client
