//! A pure interpreter of rendered iptables rulesets, for property tests against the tracer.
