//! Arbitrary bytes through weft-dns's synchronous request path
//! ([`weft_dns::ClusterDns::respond_now`]: parse, checks, zone lookup,
//! encode), over UDP and TCP, from a pod (so the server-side search path
//! applies) and from a source that is no pod. Besides "no panic", every reply
//! must be a well-formed DNS response to that request
//! ([`weft_dns_fuzz::respond`]).

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_dns::handler::Transport;
use weft_dns_fuzz::{respond, HOST, POD};

fuzz_target!(|data: &[u8]| {
    for src in [POD, HOST] {
        for transport in [Transport::Udp, Transport::Tcp] {
            respond(data, src, transport);
        }
    }
});
