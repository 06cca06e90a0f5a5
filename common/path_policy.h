// Where jobs may read and write (DESIGN.md §8): mq-coordinator --allow-read / --allow-write
// roots, checked lexically at submit and again on the worker after resolving symlinks; and
// the one checked way to name a file inside a model directory.
//
// Plain C++ (no proto, no torch) so the coordinator, the worker's RPC layer and the worker's
// model and pipeline code share it. Every function is stateless and safe from any thread;
// the resolving ones read the file system (lstat, realpath) and never create anything.
//
// Every refusal is PERMISSION_DENIED and names the field, the path and the allowed roots, e.g.
//   spec.output_uri = "/etc/x": outside the allowed write roots (/data/out); see
//   mq-coordinator --allow-write
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mq {

// The roots a job may read from and write into. Not enforced: every path is allowed. Enforced:
// a path must lie inside one root of its kind (an empty list allows nothing of that kind).
// Roots are absolute and lexically normal (NormalizeRoot).
struct PathPolicy {
  std::vector<std::string> read_roots;
  std::vector<std::string> write_roots;
  bool enforced = false;
};

enum class PathAccess { kRead, kWrite };

// The path of a location: "file:///a/b" -> "/a/b"; anything else unchanged.
absl::string_view StripFileScheme(absl::string_view location);

// `path` (absolute) with empty and "." components dropped, ".." applied ("/.." is "/") and no
// trailing '/': "/x//a/./b/../c/" -> "/x/a/c". Symlinks are not resolved.
std::string LexicalNormal(absl::string_view path);

// True when the lexically normal `path` is `root` or lies inside it, component by component:
// "/data/out2" is not inside "/data/out"; everything is inside "/".
bool PathWithin(absl::string_view path, absl::string_view root);

// A root given on the command line: must be non-empty and absolute (or file://), or an S3
// prefix "s3://bucket[/prefix]"; returns its lexical normal form. INVALID_ARGUMENT naming `flag`
// otherwise. An s3:// location is allowed only inside an s3:// root (lexically: S3 has no
// symlinks), by both checks below.
absl::StatusOr<std::string> NormalizeRoot(absl::string_view flag, absl::string_view root);

// Lexical check (the coordinator, at submit): `location` (a path or file:// URI named `field`)
// lies inside a root of `access`'s kind. OK when the policy is not enforced or the location is
// empty (an optional field left unset).
absl::Status CheckPathLexical(const PathPolicy& policy, PathAccess access, absl::string_view field,
                              absl::string_view location);

// The path the kernel would reach through `path` (absolute) with every symlink followed: the
// realpath of its existing part, then the components that do not exist yet (".." after one of
// them is applied lexically). FAILED_PRECONDITION for a dangling symlink (writing through it
// would create its target) or a component that cannot be examined (permission, loop).
absl::StatusOr<std::string> ResolvePath(absl::string_view path);

// Resolving check (the worker, before it reads or creates anything): `location` and the roots
// are resolved (ResolvePath) and compared. A location reaching outside the roots only through a
// symlink is refused naming both the path and what it resolves to.
absl::Status CheckPathResolved(const PathPolicy& policy, PathAccess access, absl::string_view field,
                               absl::string_view location);

// The path of the file `name` (a relative name, e.g. "config.json") inside the model directory
// `model_dir`, for reading. Always applied, whatever the policy: when the file is a symlink
// (itself, or through a directory on the way) that resolves outside the model directory's real
// path, PERMISSION_DENIED naming the file ("...: a symlink leading out of the model directory;
// copy the file in instead"). Symlinks that stay inside the model directory are allowed. A file
// that does not exist yields its path unchanged, so the caller reports it as missing.
absl::StatusOr<std::string> ModelDirFile(absl::string_view model_dir, absl::string_view name);

}  // namespace mq
