// Reads out of read-only file mappings that survive the file shrinking underneath them.
//
// A page of a mapped file that lies past the file's current end (the file was truncated after
// it was mapped) or that the storage cannot deliver raises SIGBUS on access, which would kill
// the process. Mappings registered here are guarded by a process-wide SIGBUS handler: a fault
// inside a registered mapping replaces the rest of that mapping, from the faulting page on,
// with zero pages, marks the mapping damaged from that offset, and lets the faulting read go
// on (on whichever thread it ran: copy loops, parallel dequantization, prefetch). Code that
// copies bytes out of a mapping calls CheckMappedRead afterwards and gets DATA_LOSS naming the
// file instead of using the zeros. A fault outside every registered mapping goes to the
// handler that was installed before (by default: the process dies, as without the guard).
//
// Threading: every function is safe from any thread. The handler only reads lock-free slots.
// At most kMaxGuardedMappings mappings are guarded at once; mappings beyond that are not
// guarded (a fault in them kills the process, as before) and RegisterMapping says so.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace mq::model {

inline constexpr int kMaxGuardedMappings = 8192;

// Guards [base, base + size) (a mapping of `path`, e.g. "model shard /m/x.safetensors" when
// `kind` is "model shard") and installs the SIGBUS handler on first use. Returns a handle for
// UnregisterMapping, or -1 when every slot is taken (the mapping is then unguarded).
int RegisterMapping(const void* base, uint64_t size, std::string path, std::string kind);

// Stops guarding the mapping (call before munmap). -1 is ignored.
void UnregisterMapping(int handle);

// OK when [data, data + len) is not inside a guarded mapping or was read intact. DATA_LOSS when
// a fault replaced any of those bytes, e.g. `model shard /m/model-00002-of-00004.safetensors
// shrank or became unreadable while reading tensor "x.weight" (mapped 8192 bytes at open, 100
// bytes on disk now; the read failed at byte 4096 of the file)`; `what` names what was read.
absl::Status CheckMappedRead(const void* data, uint64_t len, std::string_view what);

// Number of faults the handler has repaired so far (for tests and logs).
uint64_t GuardedMappingFaults();

}  // namespace mq::model
