#include "common/error_text.h"

#include <gtest/gtest.h>

#include <string>

namespace mq {
namespace {

// What c10::Error::what() looks like for a TCPStore connect failure (trimmed).
constexpr char kTorchError[] =
    "gang rendezvous failed: The client socket has timed out after 2000ms while trying to "
    "connect to (192.0.2.1, 29500).\n"
    "Exception raised from throwTimeoutError at /pytorch/torch/csrc/distributed/c10d/socket.cpp:"
    "1018 (most recent call first):\n"
    "frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x98 (0x7f in libc10.so)\n"
    "frame #1: <unknown function> + 0x5e1c2a1 (0x7f in libtorch_cpu.so)\n"
    "frame #2: c10d::TCPStore::TCPStore(std::string, c10d::TCPStoreOptions const&) + 0x2a\n";

TEST(ErrorText, StackFramesAreCut) {
  EXPECT_EQ(WithoutBacktrace(kTorchError),
            "gang rendezvous failed: The client socket has timed out after 2000ms while trying "
            "to connect to (192.0.2.1, 29500).");
}

TEST(ErrorText, TraceHeaderInsideALineIsCut) {
  EXPECT_EQ(WithoutBacktrace("bad shape [2, 3] Exception raised from foo at x.cpp:1 (most recent "
                             "call first):"),
            "bad shape [2, 3]");
}

TEST(ErrorText, PlainMessagesStayButGoOnOneLine) {
  EXPECT_EQ(WithoutBacktrace("spec.bits = 3: must be 4"), "spec.bits = 3: must be 4");
  EXPECT_EQ(WithoutBacktrace("first\n\nsecond  \n"), "first; second");
  EXPECT_EQ(WithoutBacktrace(""), "");
}

TEST(ErrorText, EventMessagesAreCapped) {
  const std::string long_message(5000, 'x');
  const std::string capped = EventMessage(long_message);
  EXPECT_LE(capped.size(), kMaxEventMessageBytes);
  EXPECT_NE(capped.find("bytes cut)"), std::string::npos);
  EXPECT_EQ(capped.rfind("xxxx", 0), 0u);
  EXPECT_EQ(EventMessage("short"), "short");
  // Never a broken UTF-8 sequence at the cut.
  std::string utf8;
  for (int i = 0; i < 1000; ++i) utf8 += "\xC3\xA9";  // é
  const std::string cut = EventMessage(utf8, 100);
  EXPECT_LE(cut.size(), 100u);
  const size_t end = cut.find(" ... (");
  ASSERT_NE(end, std::string::npos);
  EXPECT_EQ(end % 2, 0u);
  // A trace is cut before the cap is applied, so it never uses up the budget.
  std::string traced = std::string("real cause\n") + kTorchError;
  for (int i = 0; i < 100; ++i) traced += "frame #9: something + 0x1\n";
  EXPECT_EQ(EventMessage(traced),
            "real cause; gang rendezvous failed: The client socket has timed "
            "out after 2000ms while trying to connect to (192.0.2.1, "
            "29500).");
}

}  // namespace
}  // namespace mq
