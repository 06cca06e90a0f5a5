// S3Client against a real S3 server (rclone serve s3, which verifies SigV4) and, for failures,
// through tests/fakes/s3_fault_proxy.py.
#include "common/s3/s3_client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>

#include "common/sha256.h"
#include "tests/unit/common/s3/s3_test_env.h"

namespace mq::s3 {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::S3TestEnv;

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

class S3ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MQ_REQUIRE_S3(env_);
    env_.CreateBucket("bkt");
    client_ = std::make_unique<S3Client>(env_.Config());
  }
  S3TestEnv env_;
  std::unique_ptr<S3Client> client_;
};

TEST_F(S3ClientTest, PutHeadGetListDelete) {
  const std::string data = RandomBytes(100000, 1);
  ASSERT_TRUE(client_->Put("bkt", "m/a b+c/obj.bin", data, {{{"sha256", Sha256Hex(data)}}}).ok());
  absl::StatusOr<ObjectInfo> info = client_->Head("bkt", "m/a b+c/obj.bin");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, data.size());
  EXPECT_EQ(info->metadata["sha256"], Sha256Hex(data));

  std::string part(1000, '\0');
  ASSERT_TRUE(
      client_
          ->GetRange("bkt", "m/a b+c/obj.bin", 5000, 1000, reinterpret_cast<uint8_t*>(part.data()))
          .ok());
  EXPECT_EQ(part, data.substr(5000, 1000));
  absl::StatusOr<std::string> whole = client_->GetObject("bkt", "m/a b+c/obj.bin", 1 << 20);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(*whole, data);
  absl::StatusOr<std::string> small = client_->GetObject("bkt", "m/a b+c/obj.bin", 10);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kFailedPrecondition);

  ASSERT_TRUE(client_->Put("bkt", "m/z", "").ok());
  ASSERT_TRUE(client_->Put("bkt", "other", "x").ok());
  absl::StatusOr<std::vector<ListedObject>> list = client_->ListObjects("bkt", "m/");
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].key, "m/a b+c/obj.bin");
  EXPECT_EQ((*list)[0].size, data.size());
  EXPECT_EQ((*list)[1].key, "m/z");

  ASSERT_TRUE(client_->Delete("bkt", "m/z").ok());
  ASSERT_TRUE(client_->Delete("bkt", "m/z").ok());  // absent: still OK
  EXPECT_EQ(client_->Head("bkt", "m/z").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(S3ClientTest, ClearErrors) {
  uint8_t buf[16];
  absl::Status s = client_->GetRange("bkt", "missing/key", 0, 16, buf);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("s3://bkt/missing/key"));
  absl::StatusOr<ObjectInfo> h = client_->Head("no-such-bucket", "k");
  EXPECT_EQ(h.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("s3://no-such-bucket/k"));
  absl::StatusOr<std::vector<ListedObject>> l = client_->ListObjects("no-such-bucket", "");
  EXPECT_EQ(l.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(l.status().message()), HasSubstr("NoSuchBucket"));

  ASSERT_TRUE(client_->Put("bkt", "short", "0123456789").ok());
  s = client_->GetRange("bkt", "short", 8, 10, buf);  // past the end
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("past the end"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("s3://bkt/short"));
}

TEST_F(S3ClientTest, WrongSecretIsPermissionDeniedAndNeverPrinted) {
  S3Config c = env_.Config();
  c.credentials.secret_access_key = "WrongSecretValue0123456789abcdefghijklmn";
  c.credentials.source = "test source";
  S3Client bad(c);
  absl::Status s = bad.Put("bkt", "k", "data");
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("SignatureDoesNotMatch"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("test source"));
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("WrongSecretValue")));
  EXPECT_EQ(bad.stats().requests, 1u);  // not retried
}

TEST_F(S3ClientTest, MultipartUploadListAbort) {
  const std::string data = RandomBytes((11 << 20) + 12345, 2);
  absl::StatusOr<std::string> sha =
      UploadObject(*client_, "bkt", "out/layer.safetensors", data, 5 << 20, 3);
  ASSERT_TRUE(sha.ok()) << sha.status();
  EXPECT_EQ(*sha, Sha256Hex(data));
  absl::StatusOr<ObjectInfo> info = client_->Head("bkt", "out/layer.safetensors");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, data.size());
  EXPECT_EQ(info->metadata["sha256"], *sha);
  absl::StatusOr<std::string> back = client_->GetObject("bkt", "out/layer.safetensors", 1 << 30);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(Sha256Hex(*back), *sha);

  // An upload left open shows in the listing until aborted.
  absl::StatusOr<std::string> id = client_->CreateMultipartUpload("bkt", "out/open");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(client_->UploadPart("bkt", "out/open", *id, 1, data.substr(0, 5 << 20)).ok());
  absl::StatusOr<std::vector<MultipartUpload>> open = client_->ListMultipartUploads("bkt", "out/");
  ASSERT_TRUE(open.ok()) << open.status();
  ASSERT_EQ(open->size(), 1u);
  EXPECT_EQ((*open)[0].key, "out/open");
  EXPECT_EQ((*open)[0].upload_id, *id);
  ASSERT_TRUE(client_->AbortMultipartUpload("bkt", "out/open", *id).ok());
  open = client_->ListMultipartUploads("bkt", "out/");
  ASSERT_TRUE(open.ok());
  EXPECT_TRUE(open->empty());
  EXPECT_EQ(client_->Head("bkt", "out/open").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(client_->UploadPart("bkt", "out/open", *id, 0, "x").ok());  // part number
}

TEST_F(S3ClientTest, UploadFileStreamsPartsAndChecksTheRecordedHash) {
  const std::string data = RandomBytes((11 << 20) + 321, 5);
  const std::string path = ::testing::TempDir() + "/upload-file.bin";
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
  }
  absl::StatusOr<std::string> sha =
      UploadFile(*client_, "bkt", "file/layer", path, Sha256Hex(data), 5 << 20, 2);
  ASSERT_TRUE(sha.ok()) << sha.status();
  EXPECT_EQ(*sha, Sha256Hex(data));
  absl::StatusOr<std::string> back = client_->GetObject("bkt", "file/layer", 1 << 30);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, data);
  absl::StatusOr<ObjectInfo> info = client_->Head("bkt", "file/layer");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->metadata["sha256"], *sha);

  // Below a part: one Put, hash computed when none is given.
  sha = UploadFile(*client_, "bkt", "file/small", path, "", 64 << 20);
  ASSERT_TRUE(sha.ok()) << sha.status();
  EXPECT_EQ(*sha, Sha256Hex(data));

  // A file whose content is not what was recorded is not uploaded.
  sha = UploadFile(*client_, "bkt", "file/wrong", path, std::string(64, '0'), 5 << 20);
  EXPECT_EQ(sha.status().code(), absl::StatusCode::kDataLoss) << sha.status();
  EXPECT_THAT(std::string(sha.status().message()), HasSubstr(path));
  EXPECT_EQ(client_->Head("bkt", "file/wrong").status().code(), absl::StatusCode::kNotFound);
  sha = UploadFile(*client_, "bkt", "file/none", path + ".missing");
  EXPECT_EQ(sha.status().code(), absl::StatusCode::kNotFound) << sha.status();
  std::remove(path.c_str());
}

class S3FaultTest : public ::testing::Test {
 protected:
  S3FaultTest() : env_(/*with_proxy=*/true) {}
  void SetUp() override {
    MQ_REQUIRE_S3(env_);
    env_.CreateBucket("bkt");
    client_ = std::make_unique<S3Client>(env_.Config());
    data_ = RandomBytes(300000, 3);
    ASSERT_TRUE(client_->Put("bkt", "obj", data_).ok());
  }
  uint64_t Retries() const { return client_->stats().retries; }
  S3TestEnv env_;
  std::unique_ptr<S3Client> client_;
  std::string data_;
};

TEST_F(S3FaultTest, RetriesServerErrorsAndSlowDown) {
  env_.Fault("POST",
             R"([{"match":"GET /bkt/obj","kind":"status","status":500,"count":1},
                 {"match":"GET /bkt/obj","kind":"status","status":503,"count":1},
                 {"match":"GET /bkt/obj","kind":"slowdown","count":1}])");
  std::string out(data_.size(), '\0');
  ASSERT_TRUE(
      client_->GetRange("bkt", "obj", 0, out.size(), reinterpret_cast<uint8_t*>(out.data())).ok());
  EXPECT_EQ(out, data_);
  EXPECT_EQ(Retries(), 3u);
  EXPECT_THAT(env_.Fault("GET"), HasSubstr("\"slowdown\": 1"));
}

TEST_F(S3FaultTest, RetriesResetsTruncationAndStalls) {
  env_.Fault("POST", R"([{"match":"GET /bkt/obj","kind":"reset","count":1},
                         {"match":"GET /bkt/obj","kind":"reset_mid_body","count":1},
                         {"match":"GET /bkt/obj","kind":"truncate","count":1},
                         {"match":"GET /bkt/obj","kind":"stall","delay_ms":6000,"count":1},
                         {"match":"GET /bkt/obj","kind":"latency","delay_ms":300,"count":1}])");
  std::string out(200000, '\0');
  const auto start = std::chrono::steady_clock::now();
  absl::Status s =
      client_->GetRange("bkt", "obj", 1000, out.size(), reinterpret_cast<uint8_t*>(out.data()));
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(out, data_.substr(1000, out.size()));
  // (curl itself retries a reset before any answer on a reused connection, once.)
  EXPECT_GE(Retries(), 3u) << env_.Fault("GET");
  EXPECT_LE(Retries(), 4u) << env_.Fault("GET");
  // The stall is cut by the 2 s stall timeout, not waited out.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST_F(S3FaultTest, PersistentFailureIsBounded) {
  env_.Fault("POST", R"([{"match":"HEAD /bkt/obj","kind":"status","status":503,"count":100}])");
  absl::StatusOr<ObjectInfo> info = client_->Head("bkt", "obj");
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("s3://bkt/obj"));
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("HTTP 503"));
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("gave up after 6 tries"));
  EXPECT_EQ(client_->stats().requests, 1u + 6u);  // the Put in SetUp, then 6 tries
}

TEST_F(S3FaultTest, TruncatedBodyEveryTimeIsDataLoss) {
  env_.Fault("POST", R"([{"match":"GET /bkt/obj","kind":"truncate","count":100}])");
  std::string out(data_.size(), '\0');
  absl::Status s =
      client_->GetRange("bkt", "obj", 0, out.size(), reinterpret_cast<uint8_t*>(out.data()));
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("short read"));
}

TEST_F(S3FaultTest, MultipartRetriesPartsAndAbortsOnFailure) {
  const std::string data = RandomBytes((10 << 20) + 7, 4);
  env_.Fault("POST", R"([{"match":"partNumber=2","kind":"reset","count":1},
                         {"match":"partNumber=1","kind":"slowdown","count":1},
                         {"match":"POST /bkt/mp?uploadId","kind":"status","status":500,"count":1}])");
  absl::StatusOr<std::string> sha = UploadObject(*client_, "bkt", "mp", data, 5 << 20, 2);
  ASSERT_TRUE(sha.ok()) << sha.status();
  absl::StatusOr<ObjectInfo> info = client_->Head("bkt", "mp");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->size, data.size());

  // A part that never goes through: the upload is aborted, nothing is left open or visible.
  env_.Fault("DELETE");
  env_.Fault("POST", R"([{"match":"partNumber=2","kind":"status","status":500,"count":100}])");
  sha = UploadObject(*client_, "bkt", "mp2", data, 5 << 20, 2);
  ASSERT_FALSE(sha.ok());
  EXPECT_THAT(std::string(sha.status().message()), HasSubstr("UploadPart s3://bkt/mp2"));
  absl::StatusOr<std::vector<MultipartUpload>> open = client_->ListMultipartUploads("bkt", "");
  ASSERT_TRUE(open.ok()) << open.status();
  EXPECT_TRUE(open->empty());
  EXPECT_EQ(client_->Head("bkt", "mp2").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(S3FaultTest, WrongRegionSaysWhichRegionAndIsNotRetried) {
  env_.Fault("POST", R"([{"match":"GET /bkt/obj","kind":"error","status":400,
                          "code":"AuthorizationHeaderMalformed","region":"eu-west-1",
                          "message":"the region 'us-east-1' is wrong; expecting 'eu-west-1'"}])");
  const uint64_t before = client_->stats().requests;
  uint8_t buf[4];
  absl::Status s = client_->GetRange("bkt", "obj", 0, 4, buf);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("s3://bkt/obj"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("AuthorizationHeaderMalformed"));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("signed for region us-east-1; the bucket is in eu-west-1; set AWS_REGION"));
  EXPECT_EQ(client_->stats().requests, before + 1);
}

TEST(S3ClientNoServer, ConnectionRefusedIsBoundedUnavailable) {
  S3Config c;
  c.endpoint = "http://127.0.0.1:1";  // nothing listens on port 1
  c.credentials = {"AK", "SK", "", "test"};
  c.max_attempts = 3;
  c.base_backoff_ms = 1;
  S3Client client(c);
  absl::StatusOr<ObjectInfo> info = client.Head("bkt", "k");
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("gave up after 3 tries"));
}

TEST(S3ClientNoServer, UriEncode) {
  EXPECT_EQ(S3Client::UriEncode("a b/c+d~e", true), "a%20b/c%2Bd~e");
  EXPECT_EQ(S3Client::UriEncode("a/b=", false), "a%2Fb%3D");
}

}  // namespace
}  // namespace mq::s3
