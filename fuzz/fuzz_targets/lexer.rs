//! The session-state lexer on any text: no panic, statements are pieces of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtether::lexer;

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    let mut effects = Vec::new();
    lexer::analyze(&sql, &mut effects);
    for stmt in lexer::Statements::new(&sql) {
        assert!(sql.contains(stmt));
    }
});
