//! The encrypted transport's record decoder (`Cipher::open`), fed arbitrary bytes as if a
//! peer had sent them on an established connection: every outcome is plaintext that the
//! peer really sealed or an error, never a panic; and records this side sealed always open.
#![no_main]

use ftvm_replication::link::{Cipher, PairKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(key) = PairKey::from_hex(&"cd".repeat(32)) else {
        return;
    };
    let Some((_, mut open)) = Cipher::loopback(&key) else {
        return;
    };
    // Arbitrary bytes on the wire: an error or nothing (a tag cannot be forged).
    let mut plain = Vec::new();
    if let Ok(used) = open.open(data, &mut plain) {
        assert!(used <= data.len());
        assert!(plain.is_empty() || used > 0);
    }
    // What a real peer seals opens, whatever the input's size.
    let Some((mut seal2, mut open2)) = Cipher::loopback(&key) else {
        return;
    };
    let mut wire = Vec::new();
    seal2.seal(data, &mut wire).expect("seal");
    let mut back = Vec::new();
    let used = open2.open(&wire, &mut back).expect("open");
    assert_eq!(used, wire.len());
    assert_eq!(back, data);
});
