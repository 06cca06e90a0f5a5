// `mq-client verify OUTPUT_DIR`: re-checks a finished mq output against its manifest.json with
// no coordinator: every listed file is present with the listed size and SHA-256, and no other
// file is there (the owner marker .mq-job and manifest.json itself excepted).
//
// Threading: runs on the calling thread; reads files only, never writes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mq::client {

struct VerifyReport {
  int files = 0;            // files the manifest lists
  int64_t total_bytes = 0;  // their listed sizes summed
  std::string manifest_sha256;
  // One line per problem, each naming the file ("model-globals.safetensors: SHA-256 ... differs
  // from the manifest's ..."); empty when the output matches its manifest.
  std::vector<std::string> problems;
};

// Checks `output_dir`. A missing or malformed manifest is one problem naming manifest.json.
VerifyReport VerifyOutput(const std::string& output_dir);

// The same for an output in an S3 store (s3://bucket/prefix; objects read by ranged GETs, the
// client configured from the environment), plus a problem for incomplete multipart uploads
// under the prefix. Unusable S3 settings are one problem saying what is wrong.
VerifyReport VerifyS3Output(const std::string& uri);

// The command: argv[first..] = OUTPUT_DIR [--json]. Exit 0 with a one-line summary when the
// output matches its manifest, 1 with one stderr line per problem, 2 for a bad command line.
int VerifyCommand(int argc, char** argv, int first);

}  // namespace mq::client
