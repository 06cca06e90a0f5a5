#include "common/s3/s3_client.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/parallel.h"
#include "common/sha256.h"

namespace mq::s3 {
namespace {

constexpr size_t kMaxErrorBody = 64 << 10;  // kept of a non-2xx body
constexpr size_t kMaxXmlBody = 64 << 20;    // largest listing page accepted
constexpr const char* kEmptySha256 =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

std::string XmlDecode(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '&') {
      out.push_back(s[i]);
      continue;
    }
    const size_t semi = s.find(';', i);
    if (semi == absl::string_view::npos) {
      out.push_back('&');
      continue;
    }
    absl::string_view ent = s.substr(i + 1, semi - i - 1);
    uint32_t code = 0;
    if (ent == "amp") {
      out.push_back('&');
    } else if (ent == "lt") {
      out.push_back('<');
    } else if (ent == "gt") {
      out.push_back('>');
    } else if (ent == "quot") {
      out.push_back('"');
    } else if (ent == "apos") {
      out.push_back('\'');
    } else if (!ent.empty() && ent[0] == '#' &&
               ((ent.size() > 1 && (ent[1] == 'x' || ent[1] == 'X'))
                    ? absl::SimpleHexAtoi(ent.substr(2), &code)
                    : absl::SimpleAtoi(ent.substr(1), &code))) {
      // UTF-8 encode.
      if (code < 0x80) {
        out.push_back(static_cast<char>(code));
      } else if (code < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (code >> 6)));
        out.push_back(static_cast<char>(0x80 | (code & 0x3F)));
      } else if (code < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (code >> 12)));
        out.push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (code & 0x3F)));
      } else {
        out.push_back(static_cast<char>(0xF0 | (code >> 18)));
        out.push_back(static_cast<char>(0x80 | ((code >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (code & 0x3F)));
      }
    } else {
      out.append(s.data() + i, semi - i + 1);
    }
    i = semi;
  }
  return out;
}

// The raw contents of each top-level-or-nested <tag>...</tag> in `xml`, in order (S3's
// responses never nest an element inside one of the same name).
std::vector<absl::string_view> XmlElements(absl::string_view xml, absl::string_view tag) {
  std::vector<absl::string_view> out;
  const std::string open = absl::StrCat("<", tag);
  const std::string close = absl::StrCat("</", tag, ">");
  size_t pos = 0;
  while ((pos = xml.find(open, pos)) != absl::string_view::npos) {
    const size_t after = pos + open.size();
    if (after >= xml.size()) break;
    const char next = xml[after];
    if (next != '>' && next != ' ' && next != '/') {
      pos = after;
      continue;
    }
    const size_t gt = xml.find('>', after);
    if (gt == absl::string_view::npos) break;
    if (xml[gt - 1] == '/') {  // <tag/>
      out.push_back(absl::string_view());
      pos = gt + 1;
      continue;
    }
    const size_t end = xml.find(close, gt + 1);
    if (end == absl::string_view::npos) break;
    out.push_back(xml.substr(gt + 1, end - gt - 1));
    pos = end + close.size();
  }
  return out;
}

// The decoded text of the first <tag> in `xml`; empty when absent.
std::string XmlText(absl::string_view xml, absl::string_view tag) {
  std::vector<absl::string_view> e = XmlElements(xml, tag);
  return e.empty() ? std::string() : XmlDecode(e.front());
}

std::string Unquote(std::string s) {
  if (s.size() >= 2 && s.front() == '"' && s.back() == '"') return s.substr(1, s.size() - 2);
  return s;
}

}  // namespace

struct S3Client::Request {
  const char* op = "";  // "GetObject", for messages
  std::string method = "GET";
  std::string bucket;
  std::string key;
  std::vector<std::pair<std::string, std::string>> query;  // sorted by Run
  std::vector<std::string> headers;                        // "name: value"
  absl::string_view body;
  const std::string* body_sha256 = nullptr;  // precomputed hash of `body`; computed when null
  // For ranged GETs: the bytes go here and exactly `out_size` must arrive.
  uint8_t* out = nullptr;
  uint64_t out_size = 0;
  // For other 2xx bodies: kept up to this many bytes (a longer body is an error).
  size_t max_body = kMaxXmlBody;
  // When set, receives the number of tries made.
  int* tries = nullptr;
};

struct S3Client::Response {
  CURLcode curl = CURLE_OK;
  std::string curl_error;
  long http = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lowercased names
  uint64_t out_written = 0;
  bool overflow = false;
};

struct S3Client::Handle {
  CURL* curl = nullptr;
  ~Handle() {
    if (curl != nullptr) curl_easy_cleanup(curl);
  }
};

namespace {

struct Transfer {
  S3Client::Response* response;
  uint8_t* out;
  uint64_t out_size;
  size_t max_body;
  absl::string_view upload;
  size_t upload_pos = 0;
};

size_t HeaderCallback(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  absl::string_view line(data, size * n);
  if (absl::StartsWith(line, "HTTP/")) {
    // A new response (e.g. after a 100 Continue): start over.
    t->response->headers.clear();
    return size * n;
  }
  const size_t colon = line.find(':');
  if (colon != absl::string_view::npos) {
    t->response->headers[absl::AsciiStrToLower(line.substr(0, colon))] =
        std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  }
  return size * n;
}

size_t WriteCallback(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  S3Client::Response* r = t->response;
  const size_t bytes = size * n;
  const bool success = r->http >= 200 && r->http < 300;
  if (success && t->out != nullptr) {
    if (r->out_written + bytes > t->out_size) {
      r->overflow = true;
      return 0;  // aborts the transfer (CURLE_WRITE_ERROR)
    }
    std::memcpy(t->out + r->out_written, data, bytes);
    r->out_written += bytes;
    return bytes;
  }
  const size_t cap = success ? t->max_body : kMaxErrorBody;
  if (r->body.size() + bytes > cap) {
    if (success) {
      r->overflow = true;
      return 0;
    }
    r->body.append(data, cap - r->body.size());  // error bodies: keep the start
    return bytes;
  }
  r->body.append(data, bytes);
  return bytes;
}

// Aborts a transfer that moved no byte for `stall_ms` (curl's own low-speed check averages
// over several seconds, so a burst followed by a hang would go unnoticed for longer).
struct StallWatch {
  int64_t stall_ms;
  curl_off_t last_total = -1;
  std::chrono::steady_clock::time_point last_progress = std::chrono::steady_clock::now();
  bool stalled = false;
};

int ProgressCallback(void* user, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                     curl_off_t ulnow) {
  auto* w = static_cast<StallWatch*>(user);
  const auto now = std::chrono::steady_clock::now();
  if (dlnow + ulnow != w->last_total) {
    w->last_total = dlnow + ulnow;
    w->last_progress = now;
    return 0;
  }
  if (now - w->last_progress > std::chrono::milliseconds(w->stall_ms)) {
    w->stalled = true;
    return 1;  // CURLE_ABORTED_BY_CALLBACK
  }
  return 0;
}

size_t ReadCallback(char* buffer, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t want = std::min(size * n, t->upload.size() - t->upload_pos);
  std::memcpy(buffer, t->upload.data() + t->upload_pos, want);
  t->upload_pos += want;
  return want;
}

// Lets WriteCallback know the status: curl calls the header callback for the status line, then
// headers, then the write callback; the status code is final by the first body byte.
struct StatusProbe {
  CURL* curl;
  Transfer* t;
};

size_t WriteWithProbe(char* data, size_t size, size_t n, void* user) {
  auto* p = static_cast<StatusProbe*>(user);
  if (p->t->response->http == 0) {
    long code = 0;
    curl_easy_getinfo(p->curl, CURLINFO_RESPONSE_CODE, &code);
    p->t->response->http = code;
  }
  return WriteCallback(data, size, n, p->t);
}

bool RetryableCurl(CURLcode c) {
  switch (c) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_WRITE_ERROR:  // our own abort on an over-long body
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
      return true;
    default:
      return false;
  }
}

int64_t BackoffMs(const S3Config& c, int attempt) {
  // Full jitter: uniform in [0, min(max, base * 2^(attempt-1))].
  const int shift = std::min(attempt - 1, 20);
  const int64_t cap = std::min<int64_t>(c.max_backoff_ms, c.base_backoff_ms << shift);
  thread_local std::mt19937_64 rng(std::random_device{}());
  return std::uniform_int_distribution<int64_t>(0, std::max<int64_t>(cap, 0))(rng);
}

}  // namespace

S3Client::S3Client(S3Config config) : config_(std::move(config)) {
  GlobalInit();
  userpwd_ =
      absl::StrCat(config_.credentials.access_key_id, ":", config_.credentials.secret_access_key);
  sigv4_ = absl::StrCat("aws:amz:", config_.region, ":s3");
}

S3Client::~S3Client() = default;

std::string S3Client::UriEncode(absl::string_view s, bool keep_slash) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size() * 3);
  for (unsigned char c : s) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' ||
        (keep_slash && c == '/')) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

S3ClientStats S3Client::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

std::unique_ptr<S3Client::Handle> S3Client::TakeHandle() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!pool_.empty()) {
      std::unique_ptr<Handle> h = std::move(pool_.back());
      pool_.pop_back();
      return h;
    }
  }
  auto h = std::make_unique<Handle>();
  h->curl = curl_easy_init();
  return h;
}

void S3Client::ReturnHandle(std::unique_ptr<Handle> handle) {
  std::lock_guard<std::mutex> lock(mu_);
  if (pool_.size() < 64) pool_.push_back(std::move(handle));
}

S3Client::Response S3Client::Perform(Handle& handle, const Request& request) {
  Response response;
  CURL* curl = handle.curl;
  if (curl == nullptr) {
    response.curl = CURLE_FAILED_INIT;
    response.curl_error = "curl_easy_init failed";
    return response;
  }
  curl_easy_reset(curl);
  std::string url = absl::StrCat(config_.endpoint, "/", request.bucket);
  if (!request.key.empty()) absl::StrAppend(&url, "/", UriEncode(request.key, true));
  if (!request.query.empty()) {
    // curl 7.88 signs the query string as given, so it must already be canonical: sorted by
    // name, every parameter as name=value, both percent-encoded.
    std::vector<std::string> parts;
    for (const auto& [k, v] : request.query) {
      parts.push_back(absl::StrCat(UriEncode(k, false), "=", UriEncode(v, false)));
    }
    absl::StrAppend(&url, "?", absl::StrJoin(parts, "&"));
  }
  std::string sha = request.body_sha256 != nullptr ? *request.body_sha256
                    : request.body.empty()
                        ? std::string(kEmptySha256)
                        : Sha256Hex(std::string_view(request.body.data(), request.body.size()));
  curl_slist* headers = nullptr;
  std::vector<std::string> header_lines = request.headers;
  header_lines.push_back(absl::StrCat("x-amz-content-sha256: ", sha));
  if (!config_.credentials.session_token.empty()) {
    header_lines.push_back(
        absl::StrCat("x-amz-security-token: ", config_.credentials.session_token));
  }
  for (const std::string& h : header_lines) headers = curl_slist_append(headers, h.c_str());
  // (No "Expect:" override: curl 7.88 signs the emptied header but does not send it.)

  Transfer t{&response, request.out, request.out_size, request.max_body, request.body};
  StatusProbe probe{curl, &t};
  char errbuf[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, sigv4_.c_str());
  curl_easy_setopt(curl, CURLOPT_USERPWD, userpwd_.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(config_.connect_timeout_ms));
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1024L);
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME,
                   static_cast<long>(std::max<int64_t>(1, config_.stall_timeout_ms / 1000)));
  StallWatch stall{config_.stall_timeout_ms};
  curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, ProgressCallback);
  curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &stall);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, HeaderCallback);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &t);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, WriteWithProbe);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &probe);
  if (request.method == "HEAD") {
    curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  } else if (request.method == "PUT") {
    curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(curl, CURLOPT_READFUNCTION, ReadCallback);
    curl_easy_setopt(curl, CURLOPT_READDATA, &t);
    curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
  } else if (request.method == "POST") {
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, request.body.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
                     static_cast<curl_off_t>(request.body.size()));
  } else if (request.method != "GET") {
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, request.method.c_str());
  }
  response.curl = curl_easy_perform(curl);
  long code = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &code);
  response.http = code;
  if (response.curl != CURLE_OK) {
    response.curl_error = errbuf[0] ? errbuf : curl_easy_strerror(response.curl);
  }
  if (stall.stalled) {
    response.curl = CURLE_OPERATION_TIMEDOUT;
    response.curl_error =
        absl::StrCat("stalled: no byte moved for ", config_.stall_timeout_ms, " ms");
  }
  curl_slist_free_all(headers);
  return response;
}

absl::StatusOr<S3Client::Response> S3Client::Run(const Request& original) {
  Request request = original;
  std::sort(request.query.begin(), request.query.end());
  const std::string where = request.key.empty()
                                ? absl::StrCat("s3://", request.bucket)
                                : absl::StrCat("s3://", request.bucket, "/", request.key);
  std::string body_sha;
  if (request.body_sha256 == nullptr && !request.body.empty()) {
    body_sha = Sha256Hex(std::string_view(request.body.data(), request.body.size()));  // once
    request.body_sha256 = &body_sha;
  }
  std::string last_error;
  absl::StatusCode last_code = absl::StatusCode::kUnavailable;
  for (int attempt = 1; attempt <= std::max(1, config_.max_attempts); ++attempt) {
    if (attempt > 1) {
      const int64_t backoff = BackoffMs(config_, attempt - 1);
      if (config_.on_retry) {
        config_.on_retry(absl::StrCat(request.op, " ", where, ": ", last_error, "; try ", attempt,
                                      " of ", config_.max_attempts, " in ", backoff, " ms"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff));
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.retries;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.requests;
    }
    if (request.tries != nullptr) *request.tries = attempt;
    std::unique_ptr<Handle> handle = TakeHandle();
    Response r = Perform(*handle, request);
    if (r.curl != CURLE_OK || r.http < 200 || r.http >= 300) {
      handle.reset();  // a failed connection is not reused
    } else {
      ReturnHandle(std::move(handle));
    }
    if (r.curl != CURLE_OK) {
      if (r.overflow && request.out == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            request.op, " ", where, ": response larger than ", request.max_body, " bytes"));
      }
      last_error = r.overflow ? absl::StrCat("the server sent more than the ", request.out_size,
                                             " bytes asked for")
                              : absl::StrCat("transfer failed: ", r.curl_error);
      last_code = r.overflow ? absl::StatusCode::kDataLoss : absl::StatusCode::kUnavailable;
      if (r.curl == CURLE_PARTIAL_FILE && request.out != nullptr) {
        last_error = absl::StrCat("short read: ", r.out_written, " of ", request.out_size,
                                  " bytes arrived (", r.curl_error, ")");
        last_code = absl::StatusCode::kDataLoss;
      }
      if (RetryableCurl(r.curl) || r.overflow) continue;
      return absl::UnavailableError(
          absl::StrCat(request.op, " ", where, " (", config_.endpoint, "): ", last_error));
    }
    if (r.http >= 200 && r.http < 300) {
      if (request.out != nullptr && r.out_written != request.out_size) {
        // A range past the end comes back short on some servers: no retry can fix that.
        auto range = r.headers.find("content-range");
        uint64_t total = 0;
        if (range != r.headers.end() && range->second.rfind('/') != std::string::npos &&
            absl::SimpleAtoi(range->second.substr(range->second.rfind('/') + 1), &total) &&
            r.out_written < request.out_size) {
          return absl::OutOfRangeError(
              absl::StrCat(request.op, " ", where, ": the object is ", total, " bytes"));
        }
        last_error =
            absl::StrCat("short read: ", r.out_written, " of ", request.out_size, " bytes arrived");
        last_code = absl::StatusCode::kDataLoss;
        continue;
      }
      // CompleteMultipartUpload may answer 200 with an error document.
      if (request.method == "POST" && absl::StrContains(r.body, "<Error>")) {
        const std::string code = XmlText(r.body, "Code");
        last_error = absl::StrCat("HTTP 200 with error ", code, ": ", XmlText(r.body, "Message"));
        if (code == "InternalError" || code == "SlowDown" || code == "ServiceUnavailable") continue;
        return absl::InternalError(absl::StrCat(request.op, " ", where, ": ", last_error));
      }
      return r;
    }
    // An HTTP error.
    std::string code = XmlText(r.body, "Code");
    std::string message = XmlText(r.body, "Message");
    if (code.empty() && r.http == 404) code = "NotFound";
    last_error = absl::StrCat("HTTP ", r.http, code.empty() ? "" : " ", code,
                              message.empty() ? "" : ": ", message);
    const bool retryable = r.http >= 500 || r.http == 429 || code == "SlowDown" ||
                           code == "RequestTimeout" || code == "InternalError";
    if (retryable) {
      last_code = absl::StatusCode::kUnavailable;
      continue;
    }
    std::string hint;
    std::string region = XmlText(r.body, "Region");
    if (region.empty() && r.headers.count("x-amz-bucket-region")) {
      region = r.headers["x-amz-bucket-region"];
    }
    if (code == "AuthorizationHeaderMalformed" || code == "PermanentRedirect" || r.http == 301 ||
        (!region.empty() && region != config_.region)) {
      hint = absl::StrCat(" (requests are signed for region ", config_.region,
                          region.empty() ? "" : absl::StrCat("; the bucket is in ", region),
                          "; set AWS_REGION)");
    } else if (code == "SignatureDoesNotMatch" || code == "InvalidAccessKeyId") {
      hint = absl::StrCat(" (check the credentials from ", config_.credentials.source, ")");
    }
    const std::string text = absl::StrCat(request.op, " ", where, ": ", last_error, hint);
    if (r.http == 404 || code == "NoSuchKey" || code == "NoSuchBucket" || code == "NoSuchUpload") {
      return absl::NotFoundError(text);
    }
    if (r.http == 412 || code == "PreconditionFailed") return absl::AlreadyExistsError(text);
    if (r.http == 403) return absl::PermissionDeniedError(text);
    if (r.http == 416) return absl::OutOfRangeError(text);
    return absl::InvalidArgumentError(text);
  }
  return absl::Status(last_code, absl::StrCat(request.op, " ", where, ": ", last_error,
                                              " (gave up after ", config_.max_attempts, " tries)"));
}

absl::StatusOr<ObjectInfo> S3Client::Head(const std::string& bucket, const std::string& key) {
  Request req;
  req.op = "HeadObject";
  req.method = "HEAD";
  req.bucket = bucket;
  req.key = key;
  absl::StatusOr<Response> r = Run(req);
  if (!r.ok()) return r.status();
  ObjectInfo info;
  auto it = r->headers.find("content-length");
  if (it == r->headers.end() || !absl::SimpleAtoi(it->second, &info.size)) {
    return absl::InternalError(absl::StrCat("HeadObject s3://", bucket, "/", key,
                                            ": the response has no valid Content-Length"));
  }
  if (auto e = r->headers.find("etag"); e != r->headers.end()) info.etag = Unquote(e->second);
  for (const auto& [name, value] : r->headers) {
    if (absl::StartsWith(name, "x-amz-meta-")) info.metadata[name.substr(11)] = value;
  }
  return info;
}

absl::Status S3Client::GetRange(const std::string& bucket, const std::string& key, uint64_t offset,
                                uint64_t length, uint8_t* out) {
  if (length == 0) return absl::OkStatus();
  Request req;
  req.op = "GetObject";
  req.bucket = bucket;
  req.key = key;
  req.headers.push_back(absl::StrCat("Range: bytes=", offset, "-", offset + length - 1));
  req.out = out;
  req.out_size = length;
  absl::StatusOr<Response> r = Run(req);
  if (!r.ok()) {
    if (absl::IsOutOfRange(r.status())) {
      return absl::InvalidArgumentError(absl::StrCat(r.status().message(), " (bytes ", offset, "-",
                                                     offset + length - 1,
                                                     " lie past the end of the object)"));
    }
    return r.status();
  }
  // A server that ignores Range answers 200 with the whole object: accepted only when that is
  // exactly the range asked for.
  // (Some servers, rclone's among them, answer a range with 200 and a Content-Range.)
  auto range = r->headers.find("content-range");
  const bool ranged = range != r->headers.end() &&
                      absl::StartsWith(range->second, absl::StrCat("bytes ", offset, "-"));
  if (r->http == 200 && offset != 0 && !ranged) {
    return absl::InternalError(
        absl::StrCat("GetObject s3://", bucket, "/", key, ": the server ignored the Range header"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> S3Client::GetObject(const std::string& bucket, const std::string& key,
                                                uint64_t max_bytes) {
  absl::StatusOr<ObjectInfo> info = Head(bucket, key);
  if (!info.ok()) return info.status();
  if (info->size > max_bytes) {
    return absl::FailedPreconditionError(absl::StrCat("s3://", bucket, "/", key, " is ", info->size,
                                                      " bytes; at most ", max_bytes, " are read"));
  }
  std::string data(info->size, '\0');
  absl::Status s = GetRange(bucket, key, 0, info->size, reinterpret_cast<uint8_t*>(data.data()));
  if (!s.ok()) return s;
  return data;
}

namespace {
void AddPutHeaders(const PutOptions& options, std::vector<std::string>* headers) {
  headers->push_back("Content-Type: application/octet-stream");
  for (const auto& [name, value] : options.metadata) {
    headers->push_back(absl::StrCat("x-amz-meta-", absl::AsciiStrToLower(name), ": ", value));
  }
  if (options.if_none_match) headers->push_back("If-None-Match: *");
}
}  // namespace

absl::Status S3Client::Put(const std::string& bucket, const std::string& key,
                           absl::string_view data, const PutOptions& options) {
  Request req;
  req.op = "PutObject";
  req.method = "PUT";
  req.bucket = bucket;
  req.key = key;
  req.body = data;
  AddPutHeaders(options, &req.headers);
  return Run(req).status();
}

absl::StatusOr<std::string> S3Client::CreateMultipartUpload(const std::string& bucket,
                                                            const std::string& key,
                                                            const PutOptions& options) {
  Request req;
  req.op = "CreateMultipartUpload";
  req.method = "POST";
  req.bucket = bucket;
  req.key = key;
  req.query = {{"uploads", ""}};
  AddPutHeaders(options, &req.headers);
  absl::StatusOr<Response> r = Run(req);
  if (!r.ok()) return r.status();
  std::string id = XmlText(r->body, "UploadId");
  if (id.empty()) {
    return absl::InternalError(absl::StrCat("CreateMultipartUpload s3://", bucket, "/", key,
                                            ": the response has no UploadId"));
  }
  return id;
}

absl::StatusOr<std::string> S3Client::UploadPart(const std::string& bucket, const std::string& key,
                                                 const std::string& upload_id, int part_number,
                                                 absl::string_view data) {
  if (part_number < 1 || part_number > 10000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "UploadPart s3://", bucket, "/", key, ": part number ", part_number, " must be 1-10000"));
  }
  Request req;
  req.op = "UploadPart";
  req.method = "PUT";
  req.bucket = bucket;
  req.key = key;
  req.query = {{"partNumber", absl::StrCat(part_number)}, {"uploadId", upload_id}};
  req.body = data;
  absl::StatusOr<Response> r = Run(req);
  if (!r.ok()) return r.status();
  auto it = r->headers.find("etag");
  if (it == r->headers.end()) {
    return absl::InternalError(absl::StrCat("UploadPart s3://", bucket, "/", key, " part ",
                                            part_number, ": the response has no ETag"));
  }
  return Unquote(it->second);
}

absl::Status S3Client::CompleteMultipartUpload(const std::string& bucket, const std::string& key,
                                               const std::string& upload_id,
                                               const std::vector<CompletedPart>& parts) {
  std::string xml = "<CompleteMultipartUpload>";
  for (const CompletedPart& p : parts) {
    absl::StrAppend(&xml, "<Part><PartNumber>", p.part_number, "</PartNumber><ETag>\"", p.etag,
                    "\"</ETag></Part>");
  }
  absl::StrAppend(&xml, "</CompleteMultipartUpload>");
  Request req;
  req.op = "CompleteMultipartUpload";
  req.method = "POST";
  req.bucket = bucket;
  req.key = key;
  req.query = {{"uploadId", upload_id}};
  req.headers.push_back("Content-Type: application/xml");
  req.body = xml;
  int tries = 0;
  req.tries = &tries;
  absl::Status s = Run(req).status();
  // A retried Complete whose first try succeeded (the answer was lost) finds the upload gone;
  // the object then exists and the upload did complete.
  if (absl::IsNotFound(s) && tries > 1 && absl::StrContains(s.message(), "NoSuchUpload") &&
      Head(bucket, key).ok()) {
    return absl::OkStatus();
  }
  return s;
}

absl::Status S3Client::AbortMultipartUpload(const std::string& bucket, const std::string& key,
                                            const std::string& upload_id) {
  Request req;
  req.op = "AbortMultipartUpload";
  req.method = "DELETE";
  req.bucket = bucket;
  req.key = key;
  req.query = {{"uploadId", upload_id}};
  return Run(req).status();
}

absl::StatusOr<std::vector<MultipartUpload>> S3Client::ListMultipartUploads(
    const std::string& bucket, const std::string& prefix) {
  std::vector<MultipartUpload> out;
  std::string key_marker, id_marker;
  for (int page = 0; page < 100000; ++page) {
    Request req;
    req.op = "ListMultipartUploads";
    req.bucket = bucket;
    req.query = {{"uploads", ""}, {"prefix", prefix}};
    if (!key_marker.empty()) req.query.push_back({"key-marker", key_marker});
    if (!id_marker.empty()) req.query.push_back({"upload-id-marker", id_marker});
    absl::StatusOr<Response> r = Run(req);
    // Some stores (rclone's) answer NoSuchUpload for a bucket that never had an upload.
    if (absl::IsNotFound(r.status()) && absl::StrContains(r.status().message(), "NoSuchUpload")) {
      return out;
    }
    if (!r.ok()) return r.status();
    for (absl::string_view u : XmlElements(r->body, "Upload")) {
      out.push_back({XmlText(u, "Key"), XmlText(u, "UploadId")});
    }
    if (XmlText(r->body, "IsTruncated") != "true") return out;
    key_marker = XmlText(r->body, "NextKeyMarker");
    id_marker = XmlText(r->body, "NextUploadIdMarker");
    if (key_marker.empty() && id_marker.empty()) return out;
  }
  return out;
}

absl::StatusOr<std::vector<ListedObject>> S3Client::ListObjects(const std::string& bucket,
                                                                const std::string& prefix) {
  std::vector<ListedObject> out;
  std::string token;
  for (int page = 0; page < 1000000; ++page) {
    Request req;
    req.op = "ListObjectsV2";
    req.bucket = bucket;
    req.query = {{"list-type", "2"}, {"prefix", prefix}};
    if (!token.empty()) req.query.push_back({"continuation-token", token});
    absl::StatusOr<Response> r = Run(req);
    if (!r.ok()) return r.status();
    for (absl::string_view c : XmlElements(r->body, "Contents")) {
      ListedObject o;
      o.key = XmlText(c, "Key");
      (void)absl::SimpleAtoi(XmlText(c, "Size"), &o.size);
      o.etag = Unquote(XmlText(c, "ETag"));
      out.push_back(std::move(o));
    }
    token = XmlText(r->body, "NextContinuationToken");
    if (XmlText(r->body, "IsTruncated") != "true" || token.empty()) break;
  }
  std::sort(out.begin(), out.end(),
            [](const ListedObject& a, const ListedObject& b) { return a.key < b.key; });
  return out;
}

absl::Status S3Client::Delete(const std::string& bucket, const std::string& key) {
  Request req;
  req.op = "DeleteObject";
  req.method = "DELETE";
  req.bucket = bucket;
  req.key = key;
  absl::Status s = Run(req).status();
  if (absl::IsNotFound(s) && !absl::StrContains(s.message(), "NoSuchBucket")) {
    return absl::OkStatus();
  }
  return s;
}

namespace {

// Reads `n` bytes at `offset` of the object being uploaded into `buffer`.
using PartReader = std::function<absl::Status(uint64_t offset, uint64_t n, std::string* buffer)>;

// UploadObject's body for an object of `size` bytes whose SHA-256 is `sha`: one Put below
// `part_bytes`, else a multipart upload with up to `parallel` parts in flight, each read by
// `read` just before it is sent (so at most `parallel` parts are in memory).
absl::StatusOr<std::string> UploadParts(S3Client& client, const std::string& bucket,
                                        const std::string& key, uint64_t size,
                                        const std::string& sha, const PartReader& read,
                                        uint64_t part_bytes, int parallel,
                                        const PutOptions& options) {
  // S3 wants parts of at least 5 MiB (but the last); smaller ones are the caller's choice for
  // stores that take them (tests).
  constexpr uint64_t kMinPart = 64ull << 10;
  part_bytes = std::max(part_bytes, kMinPart);
  PutOptions opts = options;
  opts.metadata["sha256"] = sha;
  if (size < part_bytes) {
    std::string data;
    if (absl::Status s = read(0, size, &data); !s.ok()) return s;
    if (absl::Status s = client.Put(bucket, key, data, opts); !s.ok()) return s;
    return sha;
  }
  const uint64_t num_parts = (size + part_bytes - 1) / part_bytes;
  if (num_parts > 10000) {
    return absl::InvalidArgumentError(absl::StrCat("s3://", bucket, "/", key, ": ", size,
                                                   " bytes need ", num_parts, " parts of ",
                                                   part_bytes, " bytes; S3 allows 10000"));
  }
  absl::StatusOr<std::string> upload = client.CreateMultipartUpload(bucket, key, opts);
  if (!upload.ok()) return upload.status();
  std::vector<CompletedPart> parts(num_parts);
  std::vector<absl::Status> results(num_parts);
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  auto worker = [&] {
    std::string part;
    for (uint64_t i; !failed && (i = next.fetch_add(1)) < num_parts;) {
      const uint64_t begin = i * part_bytes;
      absl::Status got = read(begin, std::min(part_bytes, size - begin), &part);
      absl::StatusOr<std::string> etag =
          got.ok() ? client.UploadPart(bucket, key, *upload, static_cast<int>(i + 1), part)
                   : absl::StatusOr<std::string>(got);
      if (!etag.ok()) {
        results[i] = etag.status();
        failed = true;
        return;
      }
      parts[i] = {static_cast<int>(i + 1), *etag};
    }
  };
  RunOnThreads(static_cast<size_t>(std::min<uint64_t>(std::max(1, parallel), num_parts)), worker);
  absl::Status status;
  for (const absl::Status& r : results) {
    if (!r.ok()) {
      status = r;
      break;
    }
  }
  if (status.ok()) status = client.CompleteMultipartUpload(bucket, key, *upload, parts);
  if (!status.ok()) {
    absl::Status abort = client.AbortMultipartUpload(bucket, key, *upload);
    if (!abort.ok() && !absl::IsNotFound(abort)) {
      return absl::Status(status.code(), absl::StrCat(status.message(), "; aborting upload ",
                                                      *upload, " also failed: ", abort.message()));
    }
    return status;
  }
  return sha;
}

// pread until `n` bytes are in `buffer`; a file shorter than that is DATA_LOSS.
absl::Status ReadAt(int fd, const std::string& path, uint64_t offset, uint64_t n,
                    std::string* buffer) {
  buffer->resize(n);
  uint64_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, buffer->data() + done, n - done, offset + done);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": read"));
    if (r == 0) {
      return absl::DataLossError(absl::StrCat(path, ": ended at byte ", offset + done,
                                              " while uploading; the file changed"));
    }
    done += static_cast<uint64_t>(r);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> UploadObject(S3Client& client, const std::string& bucket,
                                         const std::string& key, absl::string_view data,
                                         uint64_t part_bytes, int parallel,
                                         const PutOptions& options) {
  const std::string sha = Sha256Hex(std::string_view(data.data(), data.size()));
  auto read = [&](uint64_t offset, uint64_t n, std::string* buffer) {
    buffer->assign(data.data() + offset, n);
    return absl::OkStatus();
  };
  return UploadParts(client, bucket, key, data.size(), sha, read, part_bytes, parallel, options);
}

absl::StatusOr<std::string> UploadFile(S3Client& client, const std::string& bucket,
                                       const std::string& key, const std::string& path,
                                       const std::string& sha256, uint64_t part_bytes,
                                       int parallel, const PutOptions& options) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open"));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": stat"));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  // The SHA-256 goes into the upload's metadata, which is set when the upload starts: one pass
  // over the file first (in 8 MiB reads), the parts in a second.
  Sha256 hash;
  std::string chunk;
  for (uint64_t offset = 0; offset < size; offset += chunk.size()) {
    if (absl::Status s = ReadAt(fd, path, offset, std::min<uint64_t>(8ull << 20, size - offset),
                                &chunk);
        !s.ok()) {
      return s;
    }
    hash.Update(chunk);
  }
  const std::string sha = hash.HexDigest();
  if (!sha256.empty() && sha != sha256) {
    return absl::DataLossError(
        absl::StrCat(path, ": SHA-256 differs from the recorded one; not uploaded"));
  }
  auto read = [&](uint64_t offset, uint64_t n, std::string* buffer) {
    return ReadAt(fd, path, offset, n, buffer);
  };
  return UploadParts(client, bucket, key, size, sha, read, part_bytes, parallel, options);
}

}  // namespace mq::s3
