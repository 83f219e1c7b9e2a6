// A small PNG line plot (libpng, own rasterizer): one panel per series, stacked, with axes,
// min/max labels and the title, so a run's curves can be looked at without Python.
#pragma once
#include <string>
#include <vector>

namespace lockstep::rl {

struct PlotSeries {
  std::string title;
  std::vector<double> x, y;
};

// Writes the panels to `path` (via a temporary file and a rename, so a reader never sees a
// half-written image). Non-finite points are skipped.
void write_plot_png(const std::string& path, const std::vector<PlotSeries>& series);

}  // namespace lockstep::rl
