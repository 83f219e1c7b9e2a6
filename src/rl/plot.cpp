#include "rl/plot.h"

#include <png.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>

#include "core/error.h"

namespace lockstep::rl {

namespace {

struct Rgb {
  uint8_t r, g, b;
};

class Canvas {
 public:
  Canvas(int w, int h) : w_(w), h_(h), px_(size_t(w) * h * 3, 255) {}
  int width() const { return w_; }
  int height() const { return h_; }
  void set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    uint8_t* p = &px_[(size_t(y) * w_ + x) * 3];
    p[0] = c.r, p[1] = c.g, p[2] = c.b;
  }
  // Bresenham, `thick` pixels wide (a square brush).
  void line(int x0, int y0, int x1, int y1, Rgb c, int thick = 1) {
    int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    while (true) {
      for (int a = 0; a < thick; ++a)
        for (int b = 0; b < thick; ++b) set(x0 + a, y0 + b, c);
      if (x0 == x1 && y0 == y1) break;
      int e2 = 2 * err;
      if (e2 >= dy) err += dy, x0 += sx;
      if (e2 <= dx) err += dx, y0 += sy;
    }
  }
  // Text in a 3x5 pixel font scaled by `scale`.
  void text(int x, int y, const std::string& s, Rgb c, int scale = 2) {
    for (char ch : s) {
      const uint8_t* rows = glyph(ch);
      for (int r = 0; r < 5; ++r)
        for (int col = 0; col < 3; ++col)
          if (rows[r] & (4 >> col))
            for (int a = 0; a < scale; ++a)
              for (int b = 0; b < scale; ++b) set(x + col * scale + a, y + r * scale + b, c);
      x += 4 * scale;
    }
  }
  void write(const std::string& path) const;

 private:
  static const uint8_t* glyph(char ch) {
    static const std::map<char, std::array<uint8_t, 5>> font = {
        {'0', {7, 5, 5, 5, 7}}, {'1', {2, 6, 2, 2, 7}}, {'2', {7, 1, 7, 4, 7}}, {'3', {7, 1, 7, 1, 7}},
        {'4', {5, 5, 7, 1, 1}}, {'5', {7, 4, 7, 1, 7}}, {'6', {7, 4, 7, 5, 7}}, {'7', {7, 1, 1, 1, 1}},
        {'8', {7, 5, 7, 5, 7}}, {'9', {7, 5, 7, 1, 7}}, {'a', {2, 5, 7, 5, 5}}, {'b', {6, 5, 6, 5, 6}},
        {'c', {7, 4, 4, 4, 7}}, {'d', {6, 5, 5, 5, 6}}, {'e', {7, 4, 6, 4, 7}}, {'f', {7, 4, 6, 4, 4}},
        {'g', {7, 4, 5, 5, 7}}, {'h', {5, 5, 7, 5, 5}}, {'i', {7, 2, 2, 2, 7}}, {'j', {1, 1, 1, 5, 7}},
        {'k', {5, 5, 6, 5, 5}}, {'l', {4, 4, 4, 4, 7}}, {'m', {5, 7, 7, 5, 5}}, {'n', {6, 5, 5, 5, 5}},
        {'o', {7, 5, 5, 5, 7}}, {'p', {7, 5, 7, 4, 4}}, {'q', {7, 5, 5, 7, 1}}, {'r', {6, 5, 6, 5, 5}},
        {'s', {7, 4, 7, 1, 7}}, {'t', {7, 2, 2, 2, 2}}, {'u', {5, 5, 5, 5, 7}}, {'v', {5, 5, 5, 5, 2}},
        {'w', {5, 5, 7, 7, 5}}, {'x', {5, 5, 2, 5, 5}}, {'y', {5, 5, 2, 2, 2}}, {'z', {7, 1, 2, 4, 7}},
        {'.', {0, 0, 0, 0, 2}}, {'-', {0, 0, 7, 0, 0}}, {'+', {0, 2, 7, 2, 0}}, {'_', {0, 0, 0, 0, 7}},
        {'/', {1, 1, 2, 4, 4}}, {':', {0, 2, 0, 2, 0}}, {'(', {2, 4, 4, 4, 2}}, {')', {2, 1, 1, 1, 2}},
        {'=', {0, 7, 0, 7, 0}}, {' ', {0, 0, 0, 0, 0}}};
    char lower = char(std::tolower(static_cast<unsigned char>(ch)));
    auto it = font.find(lower);
    return it == font.end() ? font.at(' ').data() : it->second.data();
  }
  int w_, h_;
  std::vector<uint8_t> px_;
};

void Canvas::write(const std::string& path) const {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  LS_CHECK(f, path, ": cannot open for writing");
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    fail(path, ": libpng failed to write the plot");
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, w_, h_, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < h_; ++y) png_write_row(png, const_cast<uint8_t*>(&px_[size_t(y) * w_ * 3]));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  LS_CHECK(std::fclose(f) == 0, path, ": write failed (the plot's last bytes)");
}

std::string short_number(double v) {
  char buf[32];
  if (v != 0 && (std::fabs(v) < 1e-3 || std::fabs(v) >= 1e5))
    std::snprintf(buf, sizeof buf, "%.2e", v);
  else
    std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

}  // namespace

void write_plot_png(const std::string& path, const std::vector<PlotSeries>& series) {
  const int W = 720, panel_h = 200, left = 80, right = 20, top = 28, bottom = 26;
  const int H = std::max<int>(1, int(series.size())) * panel_h;
  Canvas canvas(W, H);
  const Rgb axis{60, 60, 60}, grid{225, 225, 225}, line{31, 119, 180}, label{20, 20, 20};
  for (size_t p = 0; p < series.size(); ++p) {
    const auto& s = series[p];
    const int y0 = int(p) * panel_h + top, y1 = int(p + 1) * panel_h - bottom, x0 = left, x1 = W - right;
    double xmin = 1e300, xmax = -1e300, ymin = 1e300, ymax = -1e300;
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      xmin = std::min(xmin, s.x[i]), xmax = std::max(xmax, s.x[i]);
      ymin = std::min(ymin, s.y[i]), ymax = std::max(ymax, s.y[i]);
    }
    canvas.text(x0, y0 - 18, s.title, label);
    for (int g = 1; g < 4; ++g) canvas.line(x0, y0 + (y1 - y0) * g / 4, x1, y0 + (y1 - y0) * g / 4, grid);
    canvas.line(x0, y0, x0, y1, axis);
    canvas.line(x0, y1, x1, y1, axis);
    if (xmin > xmax) continue;  // no finite points
    if (ymax - ymin < 1e-12) ymin -= 0.5, ymax += 0.5;
    if (xmax - xmin < 1e-12) xmax = xmin + 1;
    canvas.text(4, y0, short_number(ymax), label);
    canvas.text(4, y1 - 10, short_number(ymin), label);
    canvas.text(x0, y1 + 6, short_number(xmin), label);
    std::string xr = short_number(xmax);
    canvas.text(x1 - int(xr.size()) * 8, y1 + 6, xr, label);
    auto px = [&](double x) { return x0 + int(std::lround((x - xmin) / (xmax - xmin) * (x1 - x0))); };
    auto py = [&](double y) { return y1 - int(std::lround((y - ymin) / (ymax - ymin) * (y1 - y0))); };
    bool have_prev = false;
    int prev_x = 0, prev_y = 0;
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      int cx = px(s.x[i]), cy = py(s.y[i]);
      if (have_prev) canvas.line(prev_x, prev_y, cx, cy, line, 2);
      else canvas.line(cx, cy, cx, cy, line, 3);
      prev_x = cx, prev_y = cy, have_prev = true;
    }
  }
  const std::string tmp = path + ".tmp";
  canvas.write(tmp);
  std::filesystem::rename(tmp, path);
}

}  // namespace lockstep::rl
