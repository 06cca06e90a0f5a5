#include "common/channel.h"

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace mq {
namespace {

constexpr size_t kMaxFileBytes = 1 << 20;

absl::StatusOr<std::string> ReadSmallFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, " = \"", path, "\": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().size() > kMaxFileBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " = \"", path, "\": larger than ", kMaxFileBytes, " bytes"));
  }
  return text.str();
}

}  // namespace

absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path) {
  auto text = ReadSmallFile(flag, path);
  if (!text.ok()) return text.status();
  if (text->find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " = \"", path, "\": not a PEM file (no -----BEGIN line)"));
  }
  return text;
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& flag, const std::string& path) {
  auto text = ReadSmallFile(flag, path);
  if (!text.ok()) return text.status();
  std::string token(absl::StripAsciiWhitespace(text->substr(0, text->find('\n'))));
  if (token.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " = \"", path, "\": the first line holds no token"));
  }
  for (char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", flag, " = \"", path, "\": the token has characters outside printable ASCII"));
    }
  }
  return token;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> SecureChannel(const std::string& address,
                                                             const ChannelSecurity& security,
                                                             grpc::ChannelArguments args) {
  if (security.insecure) {
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions ssl;
  if (!security.ca_file.empty()) {
    auto ca = ReadPemFile("tls-ca", security.ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
  }
  if (security.cert_file.empty() != security.key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key: give both or neither");
  }
  if (!security.cert_file.empty()) {
    auto cert = ReadPemFile("tls-cert", security.cert_file);
    if (!cert.ok()) return cert.status();
    auto key = ReadPemFile("tls-key", security.key_file);
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *cert;
    ssl.pem_private_key = *key;
  }
  if (!security.server_name.empty()) {
    args.SetSslTargetNameOverride(security.server_name);
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::SslCredentials(ssl);
  if (!security.token.empty()) {
    credentials = grpc::CompositeChannelCredentials(credentials,
                                                    grpc::AccessTokenCredentials(security.token));
  }
  return grpc::CreateCustomChannel(address, credentials, args);
}

}  // namespace mq
