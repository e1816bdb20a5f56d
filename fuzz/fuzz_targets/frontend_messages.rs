//! The decoders of the client messages pgtether rewrites (Parse, Bind, Describe/Close) and the
//! frame header: never a panic, and a decoded Bind rewrites to a correctly framed message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtether::protocol::{frame, frontend};

fuzz_target!(|data: &[u8]| {
    let _ = frame::header(data);
    let _ = frontend::parse(data);
    let _ = frontend::target(data);
    if let Some(b) = frontend::bind(data) {
        let mut out = bytes::BytesMut::new();
        frontend::write_bind(&mut out, &b, b"pgtether_1\0");
        assert_eq!(frame::header(&out), Some((b'B', Ok(out.len()))));
    }
});
