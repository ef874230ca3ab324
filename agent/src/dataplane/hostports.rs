//! CNI `portMappings` (hostPort): DNAT rules that match only local destinations.
