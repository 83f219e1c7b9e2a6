#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/pretokenizer.h"

#include <pcre2.h>

#include "core/error.h"

namespace lockstep {

struct PreTokenizer::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

namespace {

std::string pcre2_message(int error) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(error, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

// Match data is per thread: pcre2 needs a scratch block per concurrent match.
struct ThreadMatchData {
  pcre2_match_data* data = pcre2_match_data_create(4, nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
  pcre2_match_context* context = [this] {
    pcre2_match_context* c = pcre2_match_context_create(nullptr);
    if (stack) pcre2_jit_stack_assign(c, nullptr, stack);
    return c;
  }();
  ~ThreadMatchData() {
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(stack);
    pcre2_match_data_free(data);
  }
};

ThreadMatchData& thread_match_data() {
  thread_local ThreadMatchData data;
  return data;
}

}  // namespace

PreTokenizer::PreTokenizer(const std::string& pattern, const std::string& where)
    : pattern_(pattern), code_(std::make_unique<Code>()) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  code_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (!code_->code) {
    fail(where, ": the pre-tokenizer regex does not compile at offset ", offset, ": ", pcre2_message(error),
         " (pattern: ", pattern, ")");
  }
  jit_ = pcre2_jit_compile(code_->code, PCRE2_JIT_COMPLETE) == 0;
}

PreTokenizer::~PreTokenizer() = default;

void PreTokenizer::split_into(std::string_view text, std::vector<std::string_view>& pieces) const {
  ThreadMatchData& md = thread_match_data();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;       // where the next search starts
  size_t emitted = 0;   // end of the last piece handed out
  while (pos < text.size()) {
    // The caller has validated the UTF-8, so pcre2 need not check it again.
    int rc = pcre2_match(code_->code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md.data, md.context);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      rc = pcre2_match(code_->code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md.data,
                       md.context);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) fail("pre-tokenizer regex failed at byte ", pos, ": ", pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.data);
    const size_t start = ov[0], end = ov[1];
    if (start > emitted) pieces.push_back(text.substr(emitted, start - emitted));
    if (end > start) {
      pieces.push_back(text.substr(start, end - start));
      emitted = end;
      pos = end;
    } else {
      // An empty match: step over one whole character so the search makes progress.
      emitted = start;
      pos = start + 1;
      while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) ++pos;
    }
  }
  if (emitted < text.size()) pieces.push_back(text.substr(emitted));
}

}  // namespace lockstep
