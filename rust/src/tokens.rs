//! Exact offline token counting with the o200k_base and cl100k_base BPE vocabularies, embedded in the build.
//!
//! # Which crate, and why
//! Measured on one corpus (590 KB: Rust source, Markdown, and prose in CJK/Arabic/Devanagari/Cyrillic with
//! emoji, whitespace and digit runs), one core of the 2-core dev machine, release build, counts all equal:
//!
//! | option                        | o200k MB/s | cl100k MB/s | 26-token string | init (both) | adds to the .so |
//! |-------------------------------|-----------:|------------:|----------------:|------------:|----------------:|
//! | `tiktoken` (Python pkg, 0.14) |         29 |          20 |   2.6 / 4.3 µs  |           – |               – |
//! | `tiktoken-rs` 0.12            |         32 |          20 |   2.0 / 4.0 µs  |      126 ms |          ~5 MB  |
//! | `bpe-openai` 0.3 (`count`)    |         55 |          55 |   1.5 / 1.5 µs  |      103 ms |          ~47 MB |
//! | this module (on `bpe-openai`) |         98 |          85 |   ≈0.8 µs       |       95 ms |          ~47 MB |
//!
//! `tiktoken-rs` is the tiktoken core vendored (fancy-regex pre-tokenizer, quadratic merge on long pieces),
//! so it can't be much faster than the Python package, whose core it is. `bpe-openai` (GitHub's rust-gems)
//! pre-tokenizes with a `regex-automata` DFA (≈160 MB/s; tiktoken's look-ahead `\s+(?!\S)` emulated by a
//! second pattern) and counts with a linear backtracking BPE (100 000 × `a` in 0.65 ms; tiktoken's merge is
//! quadratic there). Its costs are size and memory: it ships both vocabularies pre-built as serialized
//! automata (cl100k 15 MB + o200k 32 MB in the .so, ~25 MB of a gzipped wheel; ≈100 MB RSS once both are
//! loaded) and its build script spends ~15 s building them. We pick it for speed and linear worst case, and
//! put two things in front, each worth roughly 1.5×: a hand-written ASCII pre-tokenizer (`ascii.rs`, which
//! hands any piece with non-ASCII in view back to the regex) and tiktoken's own first step, one hash lookup
//! for a piece that is a whole token (most are), so the backtracking encoder runs only on pieces that need
//! merging. `benches/bench_tokens.py` compares with the Python package in one run (3–8× faster).
//!
//! Exactness against the Python `tiktoken` package is tested in `tests/test_tokens.py` (corpus + random
//! Unicode), and the vocabulary we export to it ([`tiktoken_vocabulary`]) passes tiktoken's SHA-256 check
//! of OpenAI's original files.
//!
//! Cost per call, for callers that must not block: ≈7 µs per KB of ASCII-heavy text, ≈13 µs per KB of
//! non-Latin text (100 KB: 0.7–1.3 ms).
//!
//! Special tokens (`<|endoftext|>`, ...) are never recognised: text that looks like one is counted as plain
//! text, like `tiktoken`'s `encode_ordinary`.

mod ascii;
mod request;

use std::sync::LazyLock;

use rustc_hash::FxHashSet;

pub use request::estimate_input;

/// A BPE encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-5, o-series (and the fallback for unknown models).
    O200kBase,
    /// GPT-4, GPT-3.5.
    Cl100kBase,
}

impl Encoding {
    /// Parses tiktoken's name (`"o200k_base"`, `"cl100k_base"`).
    pub fn from_name(name: &str) -> Option<Encoding> {
        match name {
            "o200k_base" => Some(Encoding::O200kBase),
            "cl100k_base" => Some(Encoding::Cl100kBase),
            _ => None,
        }
    }

    /// tiktoken's name of the encoding.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }
}

/// A loaded encoding: the pre-tokenizer and BPE of `bpe-openai`, plus the set of whole tokens for the
/// one-lookup fast path.
struct Vocabulary {
    tokenizer: &'static bpe_openai::Tokenizer,
    whole_tokens: FxHashSet<&'static [u8]>,
}

impl Vocabulary {
    fn load(tokenizer: &'static bpe_openai::Tokenizer) -> Vocabulary {
        let n = tokenizer.bpe.num_tokens();
        let mut whole_tokens = FxHashSet::with_capacity_and_hasher(n, Default::default());
        for id in 0..n as u32 {
            whole_tokens.insert(tokenizer.bpe.token_bytes(id));
        }
        Vocabulary {
            tokenizer,
            whole_tokens,
        }
    }

    fn count(&self, encoding: Encoding, text: &str) -> usize {
        let bytes = text.as_bytes();
        let mut total = 0;
        let mut pos = 0;
        while pos < bytes.len() {
            let end = match ascii::next_piece(encoding, bytes, pos) {
                Some(end) => end,
                // Non-ASCII in view: the regex decides this piece. Its match at `pos` doesn't depend on the
                // text before (the patterns have no look-behind), so it runs on the rest of the text.
                None => match text
                    .get(pos..)
                    .and_then(|rest| self.tokenizer.split(rest).next())
                {
                    Some(piece) if !piece.is_empty() => pos + piece.len(),
                    _ => bytes.len(),
                },
            };
            total += self.count_piece(&bytes[pos..end]);
            pos = end;
        }
        total
    }

    fn count_piece(&self, piece: &[u8]) -> usize {
        if self.whole_tokens.contains(piece) {
            1
        } else {
            self.tokenizer.bpe.count(piece)
        }
    }
}

static O200K: LazyLock<Vocabulary> = LazyLock::new(|| Vocabulary::load(bpe_openai::o200k_base()));
static CL100K: LazyLock<Vocabulary> = LazyLock::new(|| Vocabulary::load(bpe_openai::cl100k_base()));

fn vocabulary(encoding: Encoding) -> &'static Vocabulary {
    match encoding {
        Encoding::O200kBase => &O200K,
        Encoding::Cl100kBase => &CL100K,
    }
}

/// Loads an encoding now (≈50–100 ms, once per process) rather than on the first count.
pub fn preload(encoding: Encoding) {
    let _ = vocabulary(encoding);
}

/// Number of tokens in `text`, exactly as tiktoken's `encode_ordinary` would produce.
pub fn count(encoding: Encoding, text: &str) -> usize {
    vocabulary(encoding).count(encoding, text)
}

/// Case-insensitive ASCII prefix test.
fn has_prefix(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// `s` starts with `family` and the family name ends there (`o1`, `o1-mini`; not `o10`).
fn is_family(s: &str, family: &str) -> bool {
    has_prefix(s, family)
        && !s
            .as_bytes()
            .get(family.len())
            .is_some_and(u8::is_ascii_alphanumeric)
}

/// The encoding for a model name, and whether the model is known to use it (false: a guess).
///
/// Provider prefixes (`openai/gpt-4o`, `azure/...`) and fine-tune prefixes (`ft:gpt-4o-mini:org::id`) are
/// stripped. Models without a public tokenizer (Claude, Llama, ...) get o200k_base, marked unknown.
pub fn encoding_for_model(model: &str) -> (Encoding, bool) {
    let mut name = model.trim();
    if let Some(slash) = name.rfind('/') {
        name = &name[slash + 1..];
    }
    if has_prefix(name, "ft:") {
        name = &name[3..];
    }
    const O200K_FAMILIES: [&str; 9] = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
        "gpt-oss",
    ];
    const CL100K_FAMILIES: [&str; 8] = [
        "gpt-4",
        "gpt-3.5",
        "gpt-35", // Azure's deployment spelling
        "text-embedding-3",
        "text-embedding-ada-002",
        "davinci-002",
        "babbage-002",
        "gpt-3.5-turbo",
    ];
    if O200K_FAMILIES.iter().any(|f| is_family(name, f)) {
        return (Encoding::O200kBase, true);
    }
    if CL100K_FAMILIES.iter().any(|f| is_family(name, f)) {
        return (Encoding::Cl100kBase, true);
    }
    (Encoding::O200kBase, false)
}

/// The vocabulary in tiktoken's file format (`base64(token bytes) rank\n`, by rank), rebuilt from the
/// embedded data. Byte-identical to OpenAI's published `.tiktoken` files (the tests check tiktoken's hash),
/// so the Python `tiktoken` package can be given it offline through `TIKTOKEN_CACHE_DIR`.
pub fn tiktoken_vocabulary(encoding: Encoding) -> Vec<u8> {
    let bpe = &vocabulary(encoding).tokenizer.bpe;
    let n = bpe.num_tokens();
    let mut out = Vec::with_capacity(n * 16);
    for id in 0..n as u32 {
        base64_encode(bpe.token_bytes(id), &mut out);
        out.push(b' ');
        out.extend_from_slice(id.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Standard base64 with padding (the tiktoken files' alphabet); too small a need for a dependency.
fn base64_encode(input: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63]);
        out.push(ALPHABET[(n >> 12) as usize & 63]);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63]
        } else {
            b'='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63]
        } else {
            b'='
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_counts() {
        // Reference figures from OpenAI's tiktoken.
        assert_eq!(count(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(count(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(count(Encoding::O200kBase, ""), 0);
        assert_eq!(count(Encoding::Cl100kBase, "<|endoftext|>"), 7);
    }

    #[test]
    fn fast_path_agrees_with_bpe() {
        let text = "fn main() { println!(\"héllo, 世界 👨‍👩‍👧\"); }\n\n    let x = 1234567;  \t\r\n";
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let tok = vocabulary(enc).tokenizer;
            assert_eq!(count(enc, text), tok.count(text));
        }
    }

    #[test]
    fn long_runs_are_linear() {
        let text = "a".repeat(100_000);
        assert_eq!(
            count(Encoding::O200kBase, &text),
            bpe_openai::o200k_base().count(text.as_str())
        );
    }

    #[test]
    fn models() {
        use Encoding::*;
        for (model, want) in [
            ("gpt-4o", (O200kBase, true)),
            ("openai/gpt-4o-mini", (O200kBase, true)),
            ("gpt-4.1-nano", (O200kBase, true)),
            ("gpt-5", (O200kBase, true)),
            ("o1-mini", (O200kBase, true)),
            ("o3", (O200kBase, true)),
            ("o4-mini", (O200kBase, true)),
            ("chatgpt-4o-latest", (O200kBase, true)),
            ("gpt-oss-120b", (O200kBase, true)),
            ("ft:gpt-4o-mini:org::abc", (O200kBase, true)),
            ("gpt-4", (Cl100kBase, true)),
            ("gpt-4-turbo", (Cl100kBase, true)),
            ("gpt-4-0613", (Cl100kBase, true)),
            ("gpt-3.5-turbo", (Cl100kBase, true)),
            ("gpt-35-turbo", (Cl100kBase, true)),
            ("text-embedding-3-small", (Cl100kBase, true)),
            ("text-embedding-ada-002", (Cl100kBase, true)),
            ("claude-sonnet-4-5", (O200kBase, false)),
            ("meta-llama/Llama-3.1-8B", (O200kBase, false)),
            ("o10", (O200kBase, false)),
            ("", (O200kBase, false)),
        ] {
            assert_eq!(encoding_for_model(model), want, "{model}");
        }
    }

    #[test]
    fn base64_matches_reference() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ] {
            let mut out = Vec::new();
            base64_encode(input.as_bytes(), &mut out);
            assert_eq!(out, want.as_bytes());
        }
    }

    #[test]
    fn vocabulary_shape() {
        let v = tiktoken_vocabulary(Encoding::Cl100kBase);
        assert!(v.starts_with(b"IQ== 0\n"));
        assert_eq!(v.iter().filter(|&&b| b == b'\n').count(), 100_256);
    }
}
