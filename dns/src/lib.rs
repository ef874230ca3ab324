//! weft-dns: the cluster DNS zone over the node view, its forwarder and cache.
//! Not implemented yet (the cluster DNS issue); the crate exists so the
//! workspace has the shape of the design, with `weft-model` as its only
//! dependency.
