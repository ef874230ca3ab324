//! Agent health (`/healthz`, `/livez`), Prometheus metrics (`/metrics`) and
//! the per-Service `healthCheckNodePort` servers.
