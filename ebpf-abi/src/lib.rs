#![no_std]
//! ABI.
