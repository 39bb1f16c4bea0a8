"""A varied text corpus for token-counting tests and benchmarks, and offline tiktoken set-up.

Shared by tests/test_tokens.py and benches/bench_tokens.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenrelay import _core

ENCODINGS = ("o200k_base", "cl100k_base")

# tiktoken's download address of each vocabulary: it caches the file under sha1(address).hexdigest().
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def install_tiktoken_vocabularies(cache_dir: Path) -> None:
    """Write tokenrelay's embedded vocabularies where tiktoken looks for its cached downloads.

    Point `TIKTOKEN_CACHE_DIR` at `cache_dir` before the first `tiktoken.get_encoding`.

    tiktoken checks each cached file against its SHA-256 before use, so a wrong export fails loudly (it
    would try to download, and there is no network).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name in ENCODINGS:
        key = hashlib.sha1(_TIKTOKEN_URL.format(name).encode()).hexdigest()
        (cache_dir / key).write_bytes(_core.tiktoken_vocabulary(name))


PYTHON_CODE = '''
import asyncio
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Deployment:
    """One upstream endpoint."""

    name: str
    weight: float = 1.0
    tags: list[str] = field(default_factory=list)

    async def ping(self, timeout: float = 2.5) -> bool:
        try:
            await asyncio.wait_for(self._probe(), timeout)
        except (TimeoutError, OSError) as exc:  # noqa: BLE001
            print(f"{self.name!r} failed: {exc}")
            return False
        return True
'''

RUST_CODE = r"""
impl<'a> Iterator for Splits<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<Self::Item> {
        let m = self.pat.find(Input::new(&self.text[self.last..]))?;
        self.last += m.end(); // don't re-scan
        Some(&self.text[..self.last])
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api { Chat, Completions, Responses, Messages, Embeddings }
fn main() { let v: Vec<u64> = (0..1_000_000).map(|x| x * x % 7).collect(); println!("{:?}", &v[..3]); }
"""

JS_CODE = """
const express = require('express');
const app = express();
app.get('/api/v1/users/:id', async (req, res) => {
  const user = await db.users.findOne({ where: { id: req.params.id } });
  if (!user) return res.status(404).json({ error: `User ${req.params.id} not found` });
  res.json({ ...user, fetchedAt: new Date().toISOString() });
});
// TODO: rate-limit => 429
app.listen(process.env.PORT ?? 3000, () => console.log("listening…"));
"""

GO_SQL_CODE = """
func (s *Server) handle(w http.ResponseWriter, r *http.Request) {
\tctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
\tdefer cancel()
\trows, err := s.db.QueryContext(ctx, `SELECT id, name FROM users WHERE created_at > $1 LIMIT 100;`, t)
\tif err != nil { http.Error(w, err.Error(), 500); return }
}
"""

JSON_TEXT = (
    '{"model":"gpt-4o","messages":[{"role":"user","content":"What\\u0027s 2+2?"}],'
    '"temperature":0.7,"stream":true,"stream_options":{"include_usage":true},"n":1,"stop":["\\n\\n"]}'
)

PROSE = {
    "english": (
        "It was the best of times, it was the worst of times; it was the age of wisdom... "
        "They'll say we're DONE, but I've heard THAT'S NOT how it's done. Don't you think so? "
        "e-mail me at jane.doe+tag@example.co.uk or visit https://example.com/a/b?c=d&e=f#g."
    ),
    "german_french": (
        "Größenänderung der Straße: Überprüfung läuft. L'été dernier, où êtes-vous allés ? "
        "Ça coûte 12,50 € — très cher! Ærøskøbing, Øresund, naïve café résumé."
    ),
    "chinese": "北京是中华人民共和国的首都，也是全国的政治、文化、国际交往和科技创新中心。"
    "自然语言处理很有趣！",
    "japanese": "東京は日本の首都です。ひらがな、カタカナ、漢字を組み合わせて書きます。"
    "「こんにちは」と言った。",
    "korean": "서울특별시는 대한민국의 수도이다. 한국어 자연어 처리는 어렵지만 재미있습니다.",
    "arabic": "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها. مرحبًا بالعالم! ١٢٣٤٥ ٦٧٨٩٠",
    "hebrew": "ירושלים היא עיר הבירה של ישראל. שָׁלוֹם עֲלֵיכֶם",
    "devanagari": "नई दिल्ली भारत की राजधानी है। हिन्दी भाषा में संयुक्ताक्षर जैसे क्ष, त्र, ज्ञ होते हैं। १२३४",
    "cyrillic": "Москва — столица Российской Федерации. "
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "greek_thai": "Η γρήγορη καφέ αλεπού. ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ สวัสดีครับ",
    "vietnamese": "Tiếng Việt có nhiều dấu: ă â đ ê ô ơ ư, và thanh điệu: à á ả ã ạ.",
}

EMOJI = (
    "👨‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽 thumbs 🇯🇵🇫🇷🇺🇸 flags 🧑🏿‍💻 coder ❤️‍🔥 heart on fire "
    "👩‍❤️‍💋‍👨 kiss 😀😃😄😁😆😅🤣😂 a row 🫠 melting 1️⃣ keycap #️⃣"
)

WHITESPACE_AND_DIGITS = [
    " " * 1,
    " " * 2,
    " " * 37,
    "\n" * 5,
    "\r\n" * 7,
    "\t\t\t  \n  \n\n   x",
    "   \u00a0\u2003\u3000 mixed unicode spaces \u2028 line sep \u0085 nel",
    "a  b   c    d     e\n\n\nf \t g\x0bh\x0ci",
    "trailing spaces   ",
    "trailing newline\n",
    "trailing newline then space\n ",
    "x\n\n \t",
    "中\n  ",
    "   leading spaces",
    "1234567890123456789012345678901234567890",
    "3.14159265358979 2,718,281,828 1e-10 0x7fffffff 0b1010 ١٢٣ ४५६ ¹²³ ½ Ⅻ",
    "2024-01-31T23:59:59.999Z 127.0.0.1:8080 +1 (555) 010-9999",
]

ADVERSARIAL = [
    "a" * 10_000,
    "ab" * 3_000,
    " " * 5_000 + "x",
    "\n" * 3_000,
    "1" * 2_000,
    "!" * 4_000,
    "é" * 2_000,
    "中" * 2_000,
    "🙂" * 1_000,
    "'s'S'll'LL'd " * 100,
    "I'M HERE'S THEY'RE we'VE",
    "<|endoftext|>",
    "<|endoftext|><|im_start|>system\nYou are helpful.<|im_end|>\n<|fim_prefix|><|endofprompt|>",
    "<|im_sep|> <|start|>assistant<|channel|>final<|message|>",
    "\ufeffBOM then text \u200b zero width \u200d joiner \ufffd replacement",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0352\u0353\u0354",
    "mixedCASEWordsLikeThisOne andTHISOneToo XMLHttpRequest iOS macOS",
    "/path/to/some/file.txt\n//comment\n/* block */ a/b/c//d",
]


def corpus() -> list[str]:
    """Every sample, one string each."""
    samples = [PYTHON_CODE, RUST_CODE, JS_CODE, GO_SQL_CODE, JSON_TEXT, EMOJI]
    samples += PROSE.values()
    samples += WHITESPACE_AND_DIGITS
    samples += ADVERSARIAL
    return samples


def benchmark_text(target_bytes: int = 1_000_000) -> str:
    """A realistic mix (mostly code and English, some other scripts) repeated to about `target_bytes`."""
    block = "\n".join(
        [
            PYTHON_CODE,
            RUST_CODE,
            JS_CODE,
            GO_SQL_CODE,
            JSON_TEXT,
            *(PROSE["english"] for _ in range(6)),
            *PROSE.values(),
            EMOJI,
            *WHITESPACE_AND_DIGITS,
        ]
    )
    reps = max(1, target_bytes // len(block.encode()))
    return "\n".join(block for _ in range(reps))
