//! The startup packet decoder on any body: a packet or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtether::protocol::startup::{decode, StartupPacket};

fuzz_target!(|data: &[u8]| {
    if let Ok(StartupPacket::Startup { params }) = decode(bytes::BytesMut::from(data)) {
        for (k, v) in params {
            assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
        }
    }
});
