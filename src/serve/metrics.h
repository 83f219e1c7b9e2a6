// /metrics: the scheduler's counters and gauges in the Prometheus text format (0.0.4).
#pragma once
#include <string>

#include "serve/scheduler.h"

namespace lockstep::serve {

std::string prometheus_text(const SchedulerMetrics& m);

}  // namespace lockstep::serve
