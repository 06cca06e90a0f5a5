#include "common/names.h"

namespace mq {

std::string JobStateName(mq::v1::JobState state) {
  std::string name = mq::v1::JobState_Name(state);
  constexpr char kPrefix[] = "JOB_STATE_";
  if (name.rfind(kPrefix, 0) == 0) name = name.substr(sizeof(kPrefix) - 1);
  return name;
}

bool IsTerminal(mq::v1::JobState state) {
  return state == mq::v1::JOB_STATE_SUCCEEDED || state == mq::v1::JOB_STATE_FAILED ||
         state == mq::v1::JOB_STATE_CANCELLED;
}

std::string MethodName(mq::v1::Method method) {
  switch (method) {
    case mq::v1::METHOD_AWQ:
      return "awq";
    case mq::v1::METHOD_AWQ_GPTQ:
      return "awq-gptq";
    case mq::v1::METHOD_RTN:
      return "rtn";
    default:
      return "gptq";
  }
}

}  // namespace mq
