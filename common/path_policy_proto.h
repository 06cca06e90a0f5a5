// Conversions between the wire PathPolicy (state.proto, carried on every Assignment) and the
// plain mq::PathPolicy the checks take (common/path_policy.h). Stateless.
#pragma once

#include "common/path_policy.h"
#include "mq/v1/state.pb.h"

namespace mq {

inline PathPolicy FromProto(const mq::v1::PathPolicy& p) {
  PathPolicy out;
  out.read_roots.assign(p.read_roots().begin(), p.read_roots().end());
  out.write_roots.assign(p.write_roots().begin(), p.write_roots().end());
  out.enforced = p.enforced();
  return out;
}

inline mq::v1::PathPolicy ToProto(const PathPolicy& p) {
  mq::v1::PathPolicy out;
  for (const std::string& r : p.read_roots) out.add_read_roots(r);
  for (const std::string& r : p.write_roots) out.add_write_roots(r);
  out.set_enforced(p.enforced);
  return out;
}

}  // namespace mq
