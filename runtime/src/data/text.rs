//! Byte-level text: every byte is one token, so the vocabulary is the 256 byte values.

/// The vocabulary size of byte-level text.
pub const BYTE_VOCAB: u32 = 256;

/// Turns bytes into tokens: token `i` is the value of byte `i`.
pub fn byte_tokens(bytes: &[u8]) -> Vec<u32> {
    bytes.iter().map(|&b| u32::from(b)).collect()
}

/// Turns byte-level tokens back into text.
///
/// Invalid UTF-8 becomes U+FFFD (as in [`String::from_utf8_lossy`]), and so does every token
/// that is not a byte value (256 or more), so any token sequence, for example a model's
/// samples, can be printed.
pub fn decode_bytes(tokens: &[u32]) -> String {
    let mut bytes = Vec::with_capacity(tokens.len());
    for &token in tokens {
        match u8::try_from(token) {
            Ok(byte) => bytes.push(byte),
            Err(_) => bytes.extend_from_slice("\u{fffd}".as_bytes()),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let text = "Q: 12+7=? A: 19\nhéllo";
        let tokens = byte_tokens(text.as_bytes());
        assert_eq!(tokens.len(), text.len());
        assert_eq!(tokens[0], u32::from(b'Q'));
        assert!(tokens.iter().all(|&t| t < BYTE_VOCAB));
        assert_eq!(decode_bytes(&tokens), text);
    }

    #[test]
    fn decoding_is_lossy_not_failing() {
        assert_eq!(decode_bytes(&[0x61, 0xff, 0x62]), "a\u{fffd}b");
        assert_eq!(decode_bytes(&[0x61, 300, 0x62]), "a\u{fffd}b");
        assert_eq!(decode_bytes(&[]), "");
    }
}
