// mq-bench-s3: read and write throughput of the S3 client against local disk on this machine.
// Writes BYTES of random data to a local file (write + fsync) and reads it back (cold: after
// posix_fadvise DONTNEED), then uploads the same bytes with UploadObject (multipart, 64 MiB
// parts, 4 in flight) and reads them back with 8 parallel 8 MiB ranged GETs (what
// CheckpointReader does for a staged remote tensor). The store comes from the environment
// (MQ_S3_ENDPOINT, AWS credentials); bench/run_s3_bench.sh starts rclone serve s3 for it.
//
// usage: mq-bench-s3 BUCKET LOCAL_DIR [MIB=512] [REPEATS=3]
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/s3/s3_client.h"
#include "common/s3/s3_config.h"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: mq-bench-s3 BUCKET LOCAL_DIR [MIB=512] [REPEATS=3]\n");
    return 2;
  }
  const std::string bucket = argv[1];
  const std::string path = std::string(argv[2]) + "/mq-bench-s3.bin";
  const uint64_t bytes = (argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 512) << 20;
  const int repeats = argc > 4 ? std::atoi(argv[4]) : 3;
  absl::StatusOr<mq::s3::S3Config> config = mq::s3::S3ConfigFromEnv(mq::s3::ProcessEnv());
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
    return 1;
  }
  mq::s3::S3Client client(*config);
  std::string data(bytes, '\0');
  std::mt19937_64 rng(1);
  for (size_t i = 0; i + 8 <= data.size(); i += 8) {
    const uint64_t r = rng();
    std::memcpy(data.data() + i, &r, 8);
  }
  std::vector<double> local_write, local_read, s3_write, s3_read;
  std::string back(bytes, '\0');
  for (int rep = 0; rep < repeats; ++rep) {
    double t = Now();
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    for (uint64_t off = 0; off < bytes;) {
      const ssize_t n = ::write(fd, data.data() + off, std::min<uint64_t>(8 << 20, bytes - off));
      if (n <= 0) return 1;
      off += static_cast<uint64_t>(n);
    }
    ::fsync(fd);
    ::close(fd);
    local_write.push_back(bytes / (Now() - t));
    fd = ::open(path.c_str(), O_RDONLY);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    t = Now();
    for (uint64_t off = 0; off < bytes;) {
      const ssize_t n = ::pread(fd, back.data() + off, std::min<uint64_t>(8 << 20, bytes - off),
                                static_cast<off_t>(off));
      if (n <= 0) return 1;
      off += static_cast<uint64_t>(n);
    }
    ::close(fd);
    local_read.push_back(bytes / (Now() - t));

    t = Now();
    absl::StatusOr<std::string> sha =
        mq::s3::UploadObject(client, bucket, "mq-bench/object.bin", data, 64ull << 20, 4);
    if (!sha.ok()) {
      std::fprintf(stderr, "%s\n", std::string(sha.status().message()).c_str());
      return 1;
    }
    s3_write.push_back(bytes / (Now() - t));
    t = Now();
    constexpr uint64_t kChunk = 8ull << 20;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    auto work = [&] {
      for (uint64_t i; (i = next.fetch_add(1)) * kChunk < bytes;) {
        const uint64_t off = i * kChunk;
        const uint64_t n = std::min(kChunk, bytes - off);
        if (!client
                 .GetRange(bucket, "mq-bench/object.bin", off, n,
                           reinterpret_cast<uint8_t*>(back.data() + off))
                 .ok()) {
          failed = true;
        }
      }
    };
    std::vector<std::thread> threads;
    for (int k = 0; k < 8; ++k) threads.emplace_back(work);
    for (std::thread& th : threads) th.join();
    if (failed || back != data) {
      std::fprintf(stderr, "ranged GETs failed or returned other bytes\n");
      return 1;
    }
    s3_read.push_back(bytes / (Now() - t));
  }
  ::unlink(path.c_str());
  (void)client.Delete(bucket, "mq-bench/object.bin");
  const double mb = 1e6;
  std::printf("object %llu MiB, %d repeats (medians)\n",
              static_cast<unsigned long long>(bytes >> 20), repeats);
  std::printf("local disk write+fsync  %8.1f MB/s\n", Median(local_write) / mb);
  std::printf("local disk read (cold)  %8.1f MB/s\n", Median(local_read) / mb);
  std::printf("S3 multipart upload     %8.1f MB/s  (64 MiB parts, 4 in flight, SHA-256 per part)\n",
              Median(s3_write) / mb);
  std::printf("S3 ranged GETs          %8.1f MB/s  (8 MiB ranges, 8 in flight)\n",
              Median(s3_read) / mb);
  return 0;
}
