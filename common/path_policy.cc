#include "common/path_policy.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace mq {
namespace {

// A path for a message: quoted, control bytes escaped, long ones cut.
std::string Quote(absl::string_view s) {
  constexpr size_t kMax = 200;
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F) {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    } else {
      if (c == '"' || c == '\\') out += '\\';
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMax) out += "...";
  return out + "\"";
}

const char* KindName(PathAccess access) { return access == PathAccess::kRead ? "read" : "write"; }
const char* FlagName(PathAccess access) {
  return access == PathAccess::kRead ? "--allow-read" : "--allow-write";
}
const std::vector<std::string>& RootsOf(const PathPolicy& policy, PathAccess access) {
  return access == PathAccess::kRead ? policy.read_roots : policy.write_roots;
}

// "/a/b" -> "/a"; "/a" -> "/"; "/" -> "/".
std::string Parent(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
}

std::string Join(const std::string& dir, absl::string_view name) {
  return dir == "/" ? absl::StrCat("/", name) : absl::StrCat(dir, "/", name);
}

absl::StatusOr<std::string> RealPath(const std::string& path) {
  std::unique_ptr<char, decltype(&::free)> real(::realpath(path.c_str(), nullptr), &::free);
  if (!real) return absl::ErrnoToStatus(errno, absl::StrCat(Quote(path), ": cannot resolve"));
  return std::string(real.get());
}

// The refusal: names the field, the location (and what it resolves to, when different), the
// roots and the flag that sets them.
absl::Status Refuse(const PathPolicy& policy, PathAccess access, absl::string_view field,
                    absl::string_view location, const std::string& resolved) {
  const std::vector<std::string>& roots = RootsOf(policy, access);
  std::string where = absl::StrCat(field, " = ", Quote(location), ": ");
  if (!resolved.empty()) {
    absl::StrAppend(&where, "resolves to ", Quote(resolved), " (symlinks followed), ");
  }
  if (roots.empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        where, "no ", KindName(access), " roots are allowed (the coordinator was started without ",
        FlagName(access), "); see mq-coordinator ", FlagName(access)));
  }
  return absl::PermissionDeniedError(absl::StrCat(where, "outside the allowed ", KindName(access),
                                                  " roots (", absl::StrJoin(roots, ", "),
                                                  "); see mq-coordinator ", FlagName(access)));
}

}  // namespace

absl::string_view StripFileScheme(absl::string_view location) {
  if (absl::StartsWith(location, "file://")) location.remove_prefix(7);
  return location;
}

std::string LexicalNormal(absl::string_view path) {
  std::vector<absl::string_view> parts;
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      if (!parts.empty()) parts.pop_back();  // "/.." is "/"
      continue;
    }
    parts.push_back(part);
  }
  return absl::StrCat("/", absl::StrJoin(parts, "/"));
}

bool PathWithin(absl::string_view path, absl::string_view root) {
  if (root == "/") return true;
  if (!absl::StartsWith(path, root)) return false;
  return path.size() == root.size() || path[root.size()] == '/';
}

namespace {

constexpr absl::string_view kS3Scheme = "s3://";

// An s3:// location as a path in its own namespace: "s3://b/p/" -> "/b/p" (lexically normal).
std::string S3Path(absl::string_view location) {
  return LexicalNormal(location.substr(kS3Scheme.size()));
}

// S3 locations have no symlinks: lexical containment in an s3:// root of `access`'s kind.
absl::Status CheckS3Location(const PathPolicy& policy, PathAccess access, absl::string_view field,
                             absl::string_view location);

}  // namespace

absl::StatusOr<std::string> NormalizeRoot(absl::string_view flag, absl::string_view root) {
  if (absl::StartsWith(root, kS3Scheme)) {
    const std::string path = S3Path(root);
    if (path == "/" || absl::StrContains(root, "..") ||
        absl::StrContains(root.substr(kS3Scheme.size()), "//")) {
      return absl::InvalidArgumentError(absl::StrCat(
          flag, " = ", Quote(root), ": an s3:// root is s3://bucket or s3://bucket/prefix"));
    }
    return absl::StrCat("s3:/", path);  // "s3://bucket/prefix"
  }
  const absl::string_view path = StripFileScheme(root);
  if (path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " = \"\": a root must be an absolute directory path"));
  }
  if (path.front() != '/') {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " = ", Quote(root), ": must be an absolute path (e.g. /data/models), not relative"));
  }
  for (char c : path) {
    if (c == '\0' || c == '\n' || c == '\r') {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " = ", Quote(root), ": must not contain NUL or line breaks"));
    }
  }
  return LexicalNormal(path);
}

absl::Status CheckPathLexical(const PathPolicy& policy, PathAccess access, absl::string_view field,
                              absl::string_view location) {
  if (!policy.enforced || location.empty()) return absl::OkStatus();
  if (absl::StartsWith(location, kS3Scheme)) {
    return CheckS3Location(policy, access, field, location);
  }
  const absl::string_view path = StripFileScheme(location);
  if (path.empty() || path.front() != '/') return Refuse(policy, access, field, location, "");
  const std::string normal = LexicalNormal(path);
  for (const std::string& root : RootsOf(policy, access)) {
    if (absl::StartsWith(root, kS3Scheme)) continue;
    if (PathWithin(normal, LexicalNormal(root))) return absl::OkStatus();
  }
  return Refuse(policy, access, field, location, "");
}

absl::StatusOr<std::string> ResolvePath(absl::string_view path) {
  if (path.empty() || path.front() != '/') {
    return absl::InvalidArgumentError(
        absl::StrCat(Quote(path), ": must be an absolute path to be resolved"));
  }
  std::string resolved = "/";  // real (no symlinks) up to the first missing component
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      resolved = Parent(resolved);
      continue;
    }
    const std::string candidate = Join(resolved, part);
    struct stat st;
    if (::lstat(candidate.c_str(), &st) != 0) {
      if (errno == ENOENT || errno == ENOTDIR) {  // not there (yet): taken as it is
        resolved = candidate;
        continue;
      }
      return absl::FailedPreconditionError(absl::StrCat(
          Quote(path), ": cannot examine ", Quote(candidate), ": ", std::strerror(errno)));
    }
    if (!S_ISLNK(st.st_mode)) {
      resolved = candidate;
      continue;
    }
    absl::StatusOr<std::string> real = RealPath(candidate);
    if (!real.ok()) {
      if (absl::IsNotFound(real.status())) {
        return absl::FailedPreconditionError(
            absl::StrCat(Quote(path), ": ", Quote(candidate),
                         " is a symlink to a path that does not exist (a dangling symlink)"));
      }
      return absl::FailedPreconditionError(
          absl::StrCat(Quote(path), ": ", real.status().message()));
    }
    resolved = *std::move(real);
  }
  return resolved;
}

absl::Status CheckPathResolved(const PathPolicy& policy, PathAccess access, absl::string_view field,
                               absl::string_view location) {
  if (!policy.enforced || location.empty()) return absl::OkStatus();
  if (absl::StartsWith(location, kS3Scheme)) {
    return CheckS3Location(policy, access, field, location);
  }
  const absl::string_view path = StripFileScheme(location);
  if (path.empty() || path.front() != '/') return Refuse(policy, access, field, location, "");
  absl::StatusOr<std::string> resolved = ResolvePath(path);
  if (!resolved.ok()) {
    return absl::PermissionDeniedError(
        absl::StrCat(field, " = ", Quote(location), ": cannot be checked against the allowed ",
                     KindName(access), " roots: ", resolved.status().message()));
  }
  for (const std::string& root : RootsOf(policy, access)) {
    if (absl::StartsWith(root, kS3Scheme)) continue;
    // A root that cannot be resolved (e.g. a dangling symlink) is taken as written.
    absl::StatusOr<std::string> real_root = ResolvePath(LexicalNormal(root));
    if (PathWithin(*resolved, real_root.ok() ? *real_root : LexicalNormal(root))) {
      return absl::OkStatus();
    }
  }
  const std::string lexical = LexicalNormal(path);
  return Refuse(policy, access, field, location, *resolved == lexical ? "" : *resolved);
}

namespace {
absl::Status CheckS3Location(const PathPolicy& policy, PathAccess access, absl::string_view field,
                             absl::string_view location) {
  const std::string path = S3Path(location);
  for (const std::string& root : RootsOf(policy, access)) {
    if (absl::StartsWith(root, kS3Scheme) && PathWithin(path, S3Path(root))) {
      return absl::OkStatus();
    }
  }
  return Refuse(policy, access, field, location, "");
}
}  // namespace

absl::StatusOr<std::string> ModelDirFile(absl::string_view model_dir, absl::string_view name) {
  const std::string path = absl::StrCat(model_dir, "/", name);
  // A model directory that cannot be resolved (missing): the caller's open reports it.
  absl::StatusOr<std::string> real_dir = RealPath(std::string(model_dir));
  if (!real_dir.ok()) return path;
  // A file that does not exist (or cannot be examined) is left to the caller's open, which
  // reads nothing through it.
  absl::StatusOr<std::string> real = RealPath(path);
  if (!real.ok()) return path;
  if (PathWithin(*real, *real_dir)) return path;
  return absl::PermissionDeniedError(
      absl::StrCat("model file ", Quote(name), " in ", Quote(model_dir),
                   ": a symlink leading out of the model directory; copy the file in instead"));
}

}  // namespace mq
