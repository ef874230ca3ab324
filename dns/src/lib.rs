//! weft-dns
