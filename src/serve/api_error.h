// An error the server answers with an HTTP status and an OpenAI-style error object:
//   {"error":{"message":"...","type":"invalid_request_error","param":"max_tokens","code":null}}
// Request parsing throws it; the HTTP layer turns it into the response.
#pragma once
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>

namespace lockstep::serve {

struct ApiError : std::runtime_error {
  ApiError(int status, std::string message, std::string param = {}, std::string code = {},
           std::string type = "invalid_request_error")
      : std::runtime_error(message),
        status(status),
        param(std::move(param)),
        code(std::move(code)),
        type(std::move(type)) {}
  int status;
  std::string param;  // the request field at fault ("" = none)
  std::string code;   // a machine-readable code ("" = null)
  std::string type;
};

// 400 naming the field: the usual way a request is refused.
inline ApiError bad_field(const std::string& param, const std::string& message, const std::string& code = {}) {
  return ApiError(400, param.empty() ? message : param + ": " + message, param, code);
}

inline nlohmann::json error_body(const ApiError& e) {
  auto null_or = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
  return {{"error", {{"message", e.what()}, {"type", e.type}, {"param", null_or(e.param)}, {"code", null_or(e.code)}}}};
}

}  // namespace lockstep::serve
