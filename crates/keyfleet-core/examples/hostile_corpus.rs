//! Generates keyfleet's hostile-token corpus: `crates/keyfleet-core/tests/data/hostile_corpus.json`.
//!
//! Every case is a token (plus the audience a caller asks for) and the verdict a verifier must
//! give, assigned here by hand from the verification rules, never computed by the validator.
//! The document also carries the JWKS the verifier is fed (with hostile keys of its own) and
//! the policy (`now`, issuer, leeway, size cap, maximum lifetime). Everything is deterministic
//! (fixed seeds; Ed25519 signing is deterministic), so the committed file can be checked for
//! drift: `cargo run -p keyfleet-core --example hostile_corpus` rewrites it, and
//! keyfleet-core's tests fail when it differs from what this program generates.
//!
//! Consumers: `keyfleet-core/tests/core.rs` (through `validate`) and
//! `keyfleet-verifier/tests/verifier.rs` (through the `Verify` RPC of a real node).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const NOW: i64 = 1_800_000_000;
pub const ISSUER: &str = "https://issuer.corpus.test";
pub const LEEWAY: i64 = 60;
pub const MAX_TOKEN_BYTES: usize = 8192;
pub const MAX_LIFETIME: i64 = 86_400;
/// Where the corpus is committed, relative to the keyfleet-core crate.
pub const PATH: &str = "tests/data/hostile_corpus.json";

/// The Ed25519 group order L, little-endian.
const L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}
fn good1() -> SigningKey {
    key(1)
}
fn good2() -> SigningKey {
    key(2)
}
fn attacker() -> SigningKey {
    key(66)
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn pubx(k: &SigningKey) -> String {
    b64(k.verifying_key().to_bytes())
}

/// Signs raw header and claims bytes (which need not be JSON, or UTF-8) with `k`.
fn signed(k: &SigningKey, header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = k.sign(input.as_bytes());
    format!("{input}.{}", b64(sig.to_bytes()))
}

/// `{header}.{claims}` with the given raw signature bytes.
fn with_sig(header: &[u8], claims: &[u8], sig: &[u8]) -> String {
    format!("{}.{}.{}", b64(header), b64(claims), b64(sig))
}

fn header(kid: &str) -> Value {
    json!({"alg":"EdDSA","kid":kid,"typ":"JWT"})
}

fn hdr(patch: Value) -> Vec<u8> {
    patched(header("good-1"), patch)
}

fn base_claims() -> Value {
    json!({"iss":ISSUER,"sub":"alice","aud":"orders","iat":NOW,"nbf":NOW,"exp":NOW+300,"jti":"corpus-1"})
}

/// Default claims with `patch` applied (a null member removes that claim).
fn claims(patch: Value) -> Vec<u8> {
    patched(base_claims(), patch)
}

fn patched(mut base: Value, patch: Value) -> Vec<u8> {
    let obj = base.as_object_mut().expect("object");
    for (k, v) in patch.as_object().expect("patch is an object") {
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    base.to_string().into_bytes()
}

fn good_token() -> String {
    signed(&good1(), &hdr(json!({})), &claims(json!({})))
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

/// Adds two little-endian 256-bit numbers (no overflow for S + L with S < L).
fn add_le(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let s = a[i] as u16 + b[i] as u16 + carry;
        out[i] = s as u8;
        carry = s >> 8;
    }
    out
}

/// A non-canonical encoding (y + p for a small y) of a point that decodes and is not weak.
fn non_canonical_point() -> [u8; 32] {
    for y in 2u8..19 {
        // p = 2^255 - 19; p + y little-endian is (0xed + y) ff .. ff 7f.
        let mut bytes = [0xffu8; 32];
        bytes[0] = 0xed + y;
        bytes[31] = 0x7f;
        if let Ok(k) = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            && !k.is_weak()
        {
            return bytes;
        }
    }
    panic!("no non-canonical point found")
}

/// The JWKS the verifier is fed: two good keys, and hostile entries that must all be left out.
pub fn jwks() -> String {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let entry = |kid: &str, k: &SigningKey| json!({"kty":"OKP","crv":"Ed25519","kid":kid,"x":pubx(k),"use":"sig","alg":"EdDSA"});
    let short = &key(9).verifying_key().to_bytes()[..31];
    let keys = vec![
        entry("good-1", &good1()),
        json!({"kty":"OKP","crv":"Ed25519","kid":"good-2","x":pubx(&good2()),"alg":"Ed25519","key_ops":["verify"]}),
        // Two different keys under one kid: the kid is unusable.
        entry("dup", &key(3)),
        entry("dup", &key(4)),
        // Small-order point (the identity): "psychic" signatures verify under it.
        json!({"kty":"OKP","crv":"Ed25519","kid":"weak","x":b64(identity)}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"noncanon","x":b64(non_canonical_point())}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"private","x":pubx(&key(5)),"d":b64([5u8;32])}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"enc-use","x":pubx(&key(6)),"use":"enc"}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"sign-ops","x":pubx(&key(7)),"key_ops":["sign"]}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"rs-alg","x":pubx(&key(8)),"alg":"RS256"}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"short-x","x":b64(short)}),
        json!({"kty":"OKP","crv":"X25519","kid":"x25519","x":pubx(&key(10))}),
        json!({"kty":"RSA","kid":"rsa","n":"sXch","e":"AQAB"}),
        // A symmetric key: the HS256-with-a-public-key confusion needs one of these to work.
        json!({"kty":"oct","kid":"hmac","k":pubx(&good1())}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"padded-x","x":format!("{}=",pubx(&key(11)))}),
        json!({"kty":"OKP","crv":"Ed25519","kid":"no-kid-type","x":7}),
        json!("not a jwk"),
        json!(null),
    ];
    let mut text = json!({ "keys": keys }).to_string();
    // An entry that repeats "x" (the first value good, the second an attacker's): skipped whole.
    let dup_member = format!(
        r#"{{"kty":"OKP","crv":"Ed25519","kid":"dup-member","x":"{}","x":"{}"}}"#,
        pubx(&key(12)),
        pubx(&attacker())
    );
    text.insert_str(text.len() - 2, &format!(",{dup_member}"));
    text
}

/// Kids of JWKS entries that screening leaves out, with the key that signs under each.
fn rejected_kids() -> Vec<(&'static str, SigningKey)> {
    vec![
        ("dup", key(3)),
        ("dup", key(4)),
        ("weak", key(13)),
        ("noncanon", key(14)),
        ("private", key(5)),
        ("enc-use", key(6)),
        ("sign-ops", key(7)),
        ("rs-alg", key(8)),
        ("short-x", key(9)),
        ("x25519", key(10)),
        ("rsa", key(15)),
        ("hmac", good1()),
        ("padded-x", key(11)),
        ("no-kid-type", key(16)),
        ("dup-member", key(12)),
    ]
}

struct Corpus {
    cases: Vec<Value>,
}

impl Corpus {
    fn add(&mut self, class: &str, name: impl Into<String>, token: String, expect: &str) {
        self.add_aud(class, name, token, "", expect);
    }
    fn add_aud(
        &mut self,
        class: &str,
        name: impl Into<String>,
        token: String,
        audience: &str,
        expect: &str,
    ) {
        self.cases.push(json!({
            "class": class,
            "name": name.into(),
            "token": token,
            "audience": audience,
            "expect": expect,
        }));
    }
}

/// The whole corpus document.
pub fn generate() -> Value {
    let mut c = Corpus { cases: Vec::new() };
    valid(&mut c);
    size(&mut c);
    segments(&mut c);
    header_json(&mut c);
    algorithms(&mut c);
    kids(&mut c);
    header_params(&mut c);
    embedded_keys(&mut c);
    signatures(&mut c);
    claims_json(&mut c);
    times(&mut c);
    issuers(&mut c);
    audiences(&mut c);
    claim_types(&mut c);
    payload_flips(&mut c);
    signature_bit_flips(&mut c);
    json!({
        "about": "keyfleet hostile-token corpus; generated by `cargo run -p keyfleet-core --example hostile_corpus`; do not edit",
        "now": NOW,
        "issuer": ISSUER,
        "leeway": LEEWAY,
        "max_token_bytes": MAX_TOKEN_BYTES,
        "max_lifetime": MAX_LIFETIME,
        "jwks": jwks(),
        "cases": c.cases,
    })
}

fn valid(c: &mut Corpus) {
    let k = good1();
    c.add("valid", "baseline", good_token(), "OK");
    c.add_aud("valid", "caller audience", good_token(), "orders", "OK");
    c.add(
        "valid",
        "alg Ed25519 (RFC 9864)",
        signed(&k, &hdr(json!({"alg":"Ed25519"})), &claims(json!({}))),
        "OK",
    );
    c.add(
        "valid",
        "no typ",
        signed(&k, &hdr(json!({"typ":null})), &claims(json!({}))),
        "OK",
    );
    c.add(
        "valid",
        "typ lower-case",
        signed(&k, &hdr(json!({"typ":"jwt"})), &claims(json!({}))),
        "OK",
    );
    c.add(
        "valid",
        "cty other than JWT",
        signed(&k, &hdr(json!({"cty":"json"})), &claims(json!({}))),
        "OK",
    );
    c.add(
        "valid",
        "second key",
        signed(&good2(), &hdr(json!({"kid":"good-2"})), &claims(json!({}))),
        "OK",
    );
    c.add(
        "valid",
        "custom claims nested",
        signed(
            &k,
            &hdr(json!({})),
            &claims(json!({"roles":["a","b"],"ctx":{"tenant":"t1","n":[1,2,{"x":null}]}})),
        ),
        "OK",
    );
    c.add(
        "valid",
        "no nbf, iat, sub or jti",
        signed(
            &k,
            &hdr(json!({})),
            &claims(json!({"nbf":null,"iat":null,"sub":null,"jti":null})),
        ),
        "OK",
    );
    c.add(
        "valid",
        "fractional exp",
        signed(
            &k,
            &hdr(json!({})),
            &claims(json!({"exp": NOW as f64 + 10.5})),
        ),
        "OK",
    );
    c.add(
        "valid",
        "unicode claims",
        signed(
            &k,
            &hdr(json!({})),
            &claims(json!({"sub":"зоя 🚀","name":"\u{202e}evil"})),
        ),
        "OK",
    );
    c.add(
        "valid",
        "aud array",
        signed(&k, &hdr(json!({})), &claims(json!({"aud":["x","orders"]}))),
        "OK",
    );
}

fn size(c: &mut Corpus) {
    let k = good1();
    for n in [
        MAX_TOKEN_BYTES + 1,
        MAX_TOKEN_BYTES + 2,
        16 * 1024,
        32 * 1024,
    ] {
        c.add(
            "size",
            format!("{n} bytes of junk"),
            "A".repeat(n),
            "TOO_LARGE",
        );
    }
    c.add(
        "size",
        "many dots over the cap",
        ".".repeat(MAX_TOKEN_BYTES + 1),
        "TOO_LARGE",
    );
    // A correctly signed token of exactly the cap is fine; one byte more is not.
    let (mut exact, mut over) = (None, None);
    // Base64 lengths skip one value in four: vary the header's length too.
    for extra in 0..4 {
        let h = hdr(json!({ "x": "x".repeat(extra) }));
        for pad in 5700..6100 {
            let t = signed(&k, &h, &claims(json!({ "pad": "p".repeat(pad) })));
            if t.len() == MAX_TOKEN_BYTES && exact.is_none() {
                exact = Some(t);
            } else if t.len() == MAX_TOKEN_BYTES + 1 && over.is_none() {
                over = Some(t);
            }
        }
    }
    c.add(
        "size",
        "signed, exactly the cap",
        exact.expect("a pad length hits the cap"),
        "OK",
    );
    c.add(
        "size",
        "signed, cap + 1",
        over.expect("a pad length hits cap + 1"),
        "TOO_LARGE",
    );
}

fn segments(c: &mut Corpus) {
    let good = good_token();
    let parts: Vec<&str> = good.split('.').collect();
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("one dot", ".".into()),
        ("two dots", "..".into()),
        ("three dots", "...".into()),
        ("thousand dots", ".".repeat(1000)),
        ("one segment", h.into()),
        ("two segments", format!("{h}.{p}")),
        ("four segments", format!("{good}.{s}")),
        ("trailing dot", format!("{good}.")),
        ("leading dot", format!(".{good}")),
        ("empty header", format!(".{p}.{s}")),
        ("padded header", format!("{h}=.{p}.{s}")),
        ("padded signature", format!("{h}.{p}.{s}==")),
        ("leading space", format!(" {good}")),
        ("trailing space", format!("{good} ")),
        ("trailing newline", format!("{good}\n")),
        ("inner space", format!("{h}. {p}.{s}")),
        (
            "tab in signature",
            format!("{h}.{p}.{}\t{}", &s[..10], &s[10..]),
        ),
        ("crlf", format!("{good}\r\n")),
        ("nul byte", format!("{good}\0")),
        ("bearer prefix", format!("Bearer {good}")),
        ("quoted", format!("\"{good}\"")),
        ("standard alphabet +/", {
            let std = format!("{h}.{p}.{}", s.replace('-', "+").replace('_', "/"));
            assert_ne!(std, good, "the signature has a - or _ to swap");
            std
        }),
        (
            "standard base64 header",
            format!(
                "{}.{p}.{s}",
                STANDARD.encode(r#"{"alg":"EdDSA","kid":"good-1","typ":"JWT"}???"#)
            ),
        ),
        ("url-safe padded claims", {
            let padded = (0..3)
                .map(|n| URL_SAFE.encode(claims(json!({ "x": "a".repeat(n) }))))
                .find(|e| e.ends_with('='))
                .expect("one of three lengths pads");
            format!("{h}.{padded}.{s}")
        }),
        ("percent-encoded", format!("{h}%2E{p}.{s}")),
        ("non-ascii char", format!("{h}.{p}.{}é", &s[..s.len() - 1])),
        ("fullwidth dot", good.replacen('.', "．", 1)),
        // Unpadded base64 is never 1 character past a multiple of 4.
        (
            "length 1 mod 4 signature",
            format!("{h}.{p}.{s}{}", "A".repeat((5 - s.len() % 4) % 4)),
        ),
        (
            "length 1 mod 4 header",
            format!("{h}{}.{p}.{s}", "A".repeat((5 - h.len() % 4) % 4)),
        ),
        ("non-zero trailing bits", {
            // 64 bytes -> 86 chars whose last one carries 4 unused bits; set one.
            let mut t: Vec<char> = s.chars().collect();
            let last = t.len() - 1;
            let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let idx = alphabet.find(t[last]).expect("base64url char");
            assert_eq!(idx & 0b1111, 0, "a canonical last char has 4 zero bits");
            t[last] = alphabet.as_bytes()[idx | 1] as char;
            format!("{h}.{p}.{}", t.into_iter().collect::<String>())
        }),
        (
            "JSON serialization",
            json!({"protected":h,"payload":p,"signature":s}).to_string(),
        ),
        ("only dots and base64", format!("{h}.{p}.{s}.{h}.{p}")),
    ];
    for (name, token) in cases {
        c.add("segments", name, token, "MALFORMED");
    }
    // Well-formed but empty segments: the signature is checked (and fails) before claims.
    c.add(
        "segments",
        "empty signature",
        format!("{h}.{p}."),
        "BAD_SIGNATURE",
    );
    c.add(
        "segments",
        "empty claims",
        format!("{h}..{s}"),
        "BAD_SIGNATURE",
    );
}

fn header_json(c: &mut Corpus) {
    let k = good1();
    let body = claims(json!({}));
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let raw: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"alg=EdDSA".to_vec()),
        ("empty", Vec::new()),
        ("array", br#"["EdDSA","good-1"]"#.to_vec()),
        ("string", br#""EdDSA""#.to_vec()),
        ("null", b"null".to_vec()),
        ("number", b"42".to_vec()),
        (
            "duplicate alg",
            br#"{"alg":"EdDSA","alg":"none","kid":"good-1"}"#.to_vec(),
        ),
        (
            "duplicate alg, none first",
            br#"{"alg":"none","alg":"EdDSA","kid":"good-1"}"#.to_vec(),
        ),
        (
            "duplicate kid",
            br#"{"alg":"EdDSA","kid":"good-1","kid":"good-2"}"#.to_vec(),
        ),
        (
            "duplicate in nested member",
            br#"{"alg":"EdDSA","kid":"good-1","x":{"a":1,"a":2}}"#.to_vec(),
        ),
        (
            "trailing garbage",
            br#"{"alg":"EdDSA","kid":"good-1"}x"#.to_vec(),
        ),
        (
            "two objects",
            br#"{"alg":"EdDSA","kid":"good-1"}{}"#.to_vec(),
        ),
        (
            "invalid utf-8",
            b"{\"alg\":\"EdDSA\",\"kid\":\"good-\xff\"}".to_vec(),
        ),
        (
            "overlong utf-8",
            b"{\"alg\":\"EdDSA\",\"kid\":\"\xc0\xafgood\"}".to_vec(),
        ),
        (
            "lone surrogate escape",
            br#"{"alg":"EdDSA","kid":"\ud800"}"#.to_vec(),
        ),
        (
            "utf-8 bom",
            b"\xef\xbb\xbf{\"alg\":\"EdDSA\",\"kid\":\"good-1\"}".to_vec(),
        ),
        (
            "single quotes",
            br#"{'alg':'EdDSA','kid':'good-1'}"#.to_vec(),
        ),
        (
            "trailing comma",
            br#"{"alg":"EdDSA","kid":"good-1",}"#.to_vec(),
        ),
        (
            "comment",
            br#"{"alg":"EdDSA",/*x*/"kid":"good-1"}"#.to_vec(),
        ),
        (
            "deeply nested",
            format!(r#"{{"alg":"EdDSA","kid":"good-1","x":{deep}}}"#).into_bytes(),
        ),
        ("nan", br#"{"alg":"EdDSA","kid":"good-1","x":NaN}"#.to_vec()),
        ("unterminated", br#"{"alg":"EdDSA","kid":"good-1""#.to_vec()),
        (
            "nul in key",
            b"{\"alg\":\"EdDSA\",\"kid\":\"good-1\",\"a\0\":1}".to_vec(),
        ),
    ];
    for (name, header) in raw {
        c.add("header_json", name, signed(&k, &header, &body), "MALFORMED");
    }
}

fn algorithms(c: &mut Corpus) {
    let k = good1();
    let body = claims(json!({}));
    let unsupported = [
        "none",
        "None",
        "NONE",
        "nOnE",
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "RS512",
        "PS256",
        "ES256",
        "ES384",
        "ES256K",
        "Ed448",
        "ED25519",
        "eddsa",
        "EdDSA ",
        " EdDSA",
        "EdDSA\u{0}",
        "",
        "EdDSA,none",
    ];
    for alg in unsupported {
        let h = hdr(json!({"alg":alg}));
        c.add(
            "algorithm",
            format!("alg {alg:?}, Ed25519 signature"),
            signed(&k, &h, &body),
            "UNSUPPORTED_ALGORITHM",
        );
        c.add(
            "algorithm",
            format!("alg {alg:?}, empty signature"),
            format!("{}.{}.", b64(&h), b64(&body)),
            "UNSUPPORTED_ALGORITHM",
        );
    }
    // The classic key confusion: HS256 keyed with the verifier's public key.
    for (name, secret) in [
        (
            "HS256 keyed with the raw public key",
            good1().verifying_key().to_bytes().to_vec(),
        ),
        (
            "HS256 keyed with the public key's x text",
            pubx(&good1()).into_bytes(),
        ),
        (
            "HS256 keyed with the JWK text",
            json!({"kty":"OKP","crv":"Ed25519","x":pubx(&good1())})
                .to_string()
                .into_bytes(),
        ),
    ] {
        let h = hdr(json!({"alg":"HS256"}));
        let input = format!("{}.{}", b64(&h), b64(&body));
        let mac = hmac_sha256(&secret, input.as_bytes());
        c.add(
            "algorithm",
            name,
            format!("{input}.{}", b64(mac)),
            "UNSUPPORTED_ALGORITHM",
        );
        // Same, claiming EdDSA: the 32-byte MAC is not a 64-byte signature.
        let h = hdr(json!({}));
        let input = format!("{}.{}", b64(&h), b64(&body));
        let mac = hmac_sha256(&secret, input.as_bytes());
        c.add(
            "algorithm",
            format!("{name}, alg EdDSA"),
            format!("{input}.{}", b64(mac)),
            "BAD_SIGNATURE",
        );
    }
    for (name, alg) in [
        ("alg missing", Value::Null),
        ("alg number", json!(1)),
        ("alg array", json!(["EdDSA"])),
        ("alg object", json!({"name":"EdDSA"})),
        ("alg bool", json!(true)),
    ] {
        let h = if alg.is_null() {
            hdr(json!({"alg":null}))
        } else {
            hdr(json!({ "alg": alg }))
        };
        c.add("algorithm", name, signed(&k, &h, &body), "MALFORMED");
    }
}

fn kids(c: &mut Corpus) {
    let k = good1();
    let body = claims(json!({}));
    for (name, kid) in [
        ("kid missing", Value::Null),
        ("kid empty", json!("")),
        ("kid number", json!(1)),
        ("kid array", json!(["good-1"])),
        ("kid object", json!({"kid":"good-1"})),
        ("kid bool", json!(false)),
    ] {
        let h = if kid.is_null() {
            hdr(json!({"kid":null}))
        } else {
            hdr(json!({ "kid": kid }))
        };
        c.add("kid", name, signed(&k, &h, &body), "MALFORMED");
    }
    let long = "k".repeat(4000);
    for kid in [
        "unknown",
        "../../../../dev/null",
        "/etc/passwd",
        "' OR '1'='1",
        "good-1' --",
        "good-1\u{0}",
        "good-1 ",
        " good-1",
        "GOOD-1",
        "good-1\n",
        "gооd-1",
        "http://127.0.0.1:9/jwks.json",
        "%67ood-1",
        "good-1/../good-2",
        "*",
        "good-1,good-2",
        "${jndi:ldap://127.0.0.1/a}",
        "{{kid}}",
        long.as_str(),
    ] {
        c.add(
            "kid",
            format!("kid {:?}", kid.chars().take(40).collect::<String>()),
            signed(&k, &hdr(json!({ "kid": kid })), &body),
            "UNKNOWN_KID",
        );
    }
    // Every key that screening left out of the JWKS: its kid is unknown to the verifier.
    for (kid, signer) in rejected_kids() {
        c.add(
            "jwks_screening",
            format!("signed by the key published as {kid:?}"),
            signed(&signer, &hdr(json!({ "kid": kid })), &body),
            "UNKNOWN_KID",
        );
    }
    // The identity point as a key makes the all-zero-ish "psychic" signature verify: refused.
    let mut psychic = [0u8; 64];
    psychic[0] = 1;
    c.add(
        "jwks_screening",
        "psychic signature under the weak key",
        with_sig(&hdr(json!({"kid":"weak"})), &body, &psychic),
        "UNKNOWN_KID",
    );
}

fn header_params(c: &mut Corpus) {
    let k = good1();
    let body = claims(json!({}));
    let refused: Vec<(&str, Value)> = vec![
        ("crit exp", json!({"crit":["exp"]})),
        ("crit empty", json!({"crit":[]})),
        ("crit unknown", json!({"crit":["urn:x"],"urn:x":true})),
        ("crit string", json!({"crit":"exp"})),
        ("crit null", json!({"crit":Value::Null})),
        ("b64 false", json!({"b64":false,"crit":["b64"]})),
        ("b64 false, no crit", json!({"b64":false})),
        ("b64 true", json!({"b64":true})),
        ("zip DEF", json!({"zip":"DEF"})),
        ("enc", json!({"enc":"A128GCM"})),
        ("cty JWT", json!({"cty":"JWT"})),
        ("cty jwt", json!({"cty":"jwt"})),
        ("typ JOSE", json!({"typ":"JOSE"})),
        ("typ at+jwt", json!({"typ":"at+jwt"})),
        ("typ empty", json!({"typ":""})),
        ("typ number", json!({"typ":1})),
        ("typ array", json!({"typ":["JWT"]})),
    ];
    for (name, patch) in refused {
        // `crit: null` must be refused too: patch it in by hand (null removes in `hdr`).
        let h = if name == "crit null" {
            br#"{"alg":"EdDSA","kid":"good-1","crit":null}"#.to_vec()
        } else {
            hdr(patch)
        };
        c.add("header_params", name, signed(&k, &h, &body), "MALFORMED");
    }
}

fn embedded_keys(c: &mut Corpus) {
    let a = attacker();
    let body = claims(json!({}));
    let evil_jwk = json!({"kty":"OKP","crv":"Ed25519","x":pubx(&a)});
    let evil_kid = keyfleet_core::jwk::thumbprint(&a.verifying_key().to_bytes());
    let embedded: Vec<(&str, Value)> = vec![
        ("jwk", json!({ "jwk": evil_jwk })),
        ("jku", json!({"jku":"http://127.0.0.1:9/jwks.json"})),
        ("x5u", json!({"x5u":"http://127.0.0.1:9/cert.pem"})),
        (
            "x5c",
            json!({"x5c":["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]}),
        ),
        (
            "jwk with kid",
            json!({ "jwk": {"kty":"OKP","crv":"Ed25519","x":pubx(&a),"kid":"good-1"} }),
        ),
    ];
    for (name, patch) in &embedded {
        c.add(
            "embedded_key",
            format!("{name}: attacker-signed, kid of a real key"),
            signed(&a, &hdr(patch.clone()), &body),
            "BAD_SIGNATURE",
        );
        let mut p = patch.clone();
        p["kid"] = json!(evil_kid);
        c.add(
            "embedded_key",
            format!("{name}: attacker-signed, attacker's kid"),
            signed(&a, &hdr(p), &body),
            "UNKNOWN_KID",
        );
        let mut p = patch.clone();
        p["kid"] = Value::Null;
        c.add(
            "embedded_key",
            format!("{name}: attacker-signed, no kid"),
            signed(&a, &hdr(p), &body),
            "MALFORMED",
        );
        // A real key's signature with the parameter present: it is ignored, not refused.
        c.add(
            "embedded_key",
            format!("{name}: signed by the real key (parameter ignored)"),
            signed(&good1(), &hdr(patch.clone()), &body),
            "OK",
        );
    }
}

fn signatures(c: &mut Corpus) {
    let k = good1();
    let h = hdr(json!({}));
    let body = claims(json!({}));
    let input = format!("{}.{}", b64(&h), b64(&body));
    let sig = k.sign(input.as_bytes()).to_bytes();
    let (r, s): ([u8; 32], [u8; 32]) = (
        sig[..32].try_into().expect("32"),
        sig[32..].try_into().expect("32"),
    );
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let cat = |r: &[u8; 32], s: &[u8; 32]| [&r[..], &s[..]].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("all zero", vec![0; 64]),
        ("all ones", vec![0xff; 64]),
        ("R identity, S zero", cat(&identity, &[0; 32])),
        ("R identity, real S", cat(&identity, &s)),
        ("real R, S zero", cat(&r, &[0; 32])),
        ("S + L (malleated, non-canonical)", cat(&r, &add_le(&s, &L))),
        (
            "S + 2L (non-canonical)",
            cat(&r, &add_le(&add_le(&s, &L), &L)),
        ),
        ("S = L", cat(&r, &L)),
        ("S all 0xff", cat(&r, &[0xff; 32])),
        ("R all 0xff (not a point)", cat(&[0xff; 32], &s)),
        ("R and S swapped", cat(&s, &r)),
        ("truncated to 63 bytes", sig[..63].to_vec()),
        ("extended to 65 bytes", [&sig[..], &[0]].concat()),
        ("doubled", [&sig[..], &sig[..]].concat()),
        ("32 bytes", sig[..32].to_vec()),
        ("one byte", vec![1]),
        ("reversed", sig.iter().rev().copied().collect()),
    ];
    for (name, sig) in cases {
        c.add(
            "signature",
            name,
            with_sig(&h, &body, &sig),
            "BAD_SIGNATURE",
        );
    }
    let other = |signer: &SigningKey, msg: &[u8]| signer.sign(msg).to_bytes().to_vec();
    let more: Vec<(&str, Vec<u8>)> = vec![
        (
            "signed by the other good key",
            other(&good2(), input.as_bytes()),
        ),
        (
            "signed by an attacker",
            other(&attacker(), input.as_bytes()),
        ),
        (
            "signature over the header only",
            other(&k, b64(&h).as_bytes()),
        ),
        (
            "signature over the decoded JSON",
            other(&k, &[&h[..], b".", &body[..]].concat()),
        ),
        (
            "signature over the claims only",
            other(&k, b64(&body).as_bytes()),
        ),
        (
            "signature over input with a trailing dot",
            other(&k, format!("{input}.").as_bytes()),
        ),
    ];
    for (name, sig) in more {
        c.add(
            "signature",
            name,
            with_sig(&h, &body, &sig),
            "BAD_SIGNATURE",
        );
    }
    // A valid signature moved onto other claims.
    let forged = claims(json!({"sub":"admin"}));
    c.add(
        "signature",
        "real signature, other claims",
        with_sig(&h, &forged, &sig),
        "BAD_SIGNATURE",
    );
    c.add(
        "signature",
        "real signature, other header",
        with_sig(&hdr(json!({"typ":null})), &body, &sig),
        "BAD_SIGNATURE",
    );
    // The Wycheproof-style edge: a signature valid for good-2's key presented under good-1.
    c.add(
        "signature",
        "kid swapped to the other good key",
        with_sig(&hdr(json!({"kid":"good-2"})), &body, &sig),
        "BAD_SIGNATURE",
    );
}

fn claims_json(c: &mut Corpus) {
    let k = good1();
    let h = hdr(json!({}));
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let exp = NOW + 300;
    let raw: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"exp=1".to_vec()),
        ("empty", Vec::new()),
        ("array", b"[1,2]".to_vec()),
        ("string", br#""claims""#.to_vec()),
        ("null", b"null".to_vec()),
        (
            "duplicate exp (later one expired)",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp},"exp":1}}"#).into_bytes(),
        ),
        (
            "duplicate exp (later one valid)",
            format!(r#"{{"iss":"{ISSUER}","exp":1,"exp":{exp}}}"#).into_bytes(),
        ),
        (
            "duplicate iss",
            format!(r#"{{"iss":"https://evil.test","iss":"{ISSUER}","exp":{exp}}}"#).into_bytes(),
        ),
        (
            "duplicate aud",
            format!(r#"{{"iss":"{ISSUER}","aud":"x","aud":"orders","exp":{exp}}}"#).into_bytes(),
        ),
        (
            "duplicate sub",
            format!(r#"{{"iss":"{ISSUER}","sub":"a","sub":"admin","exp":{exp}}}"#).into_bytes(),
        ),
        (
            "duplicate custom claim",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp},"role":"user","role":"admin"}}"#)
                .into_bytes(),
        ),
        (
            "duplicate nested member",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp},"ctx":{{"r":1,"r":2}}}}"#).into_bytes(),
        ),
        (
            "duplicate member in an array's object",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp},"l":[{{"r":1,"r":2}}]}}"#).into_bytes(),
        ),
        (
            "duplicate via escape",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp},"\u0065xp":1}}"#).into_bytes(),
        ),
        (
            "invalid utf-8",
            [
                format!(r#"{{"iss":"{ISSUER}","exp":{exp},"sub":"a"#).as_bytes(),
                b"\xff\"}",
            ]
            .concat(),
        ),
        (
            "lone surrogate",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp},"sub":"\udc00"}}"#).into_bytes(),
        ),
        (
            "utf-8 bom",
            [b"\xef\xbb\xbf".as_slice(), &claims(json!({}))].concat(),
        ),
        (
            "trailing garbage",
            [&claims(json!({}))[..], b"garbage"].concat(),
        ),
        (
            "deeply nested",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp},"x":{deep}}}"#).into_bytes(),
        ),
        (
            "NaN",
            format!(r#"{{"iss":"{ISSUER}","exp":NaN}}"#).into_bytes(),
        ),
        (
            "Infinity",
            format!(r#"{{"iss":"{ISSUER}","exp":Infinity}}"#).into_bytes(),
        ),
        (
            "hex number",
            format!(r#"{{"iss":"{ISSUER}","exp":0x7fffffff}}"#).into_bytes(),
        ),
        (
            "leading zero number",
            format!(r#"{{"iss":"{ISSUER}","exp":0{exp}}}"#).into_bytes(),
        ),
        ("single quotes", b"{'iss':'x','exp':1}".to_vec()),
        (
            "unterminated",
            format!(r#"{{"iss":"{ISSUER}","exp":{exp}"#).into_bytes(),
        ),
    ];
    for (name, body) in raw {
        c.add("claims_json", name, signed(&k, &h, &body), "MALFORMED");
    }
}

fn times(c: &mut Corpus) {
    let k = good1();
    let h = hdr(json!({}));
    let t = |patch: Value| signed(&k, &h, &claims(patch));
    let cases: Vec<(&str, Value, &str)> = vec![
        ("exp missing", json!({"exp":null}), "MALFORMED"),
        ("exp string", json!({"exp":"1800000300"}), "MALFORMED"),
        ("exp bool", json!({"exp":true}), "MALFORMED"),
        ("exp array", json!({"exp":[NOW + 300]}), "MALFORMED"),
        ("exp object", json!({"exp":{"t":NOW + 300}}), "MALFORMED"),
        ("exp negative", json!({"exp":-1}), "MALFORMED"),
        ("exp 1e300", json!({"exp":1e300}), "MALFORMED"),
        ("exp i64 max", json!({"exp":i64::MAX}), "MALFORMED"),
        ("exp u64 max", json!({"exp":u64::MAX}), "MALFORMED"),
        (
            "exp past year 9999",
            json!({"exp":253_402_300_800i64}),
            "MALFORMED",
        ),
        ("exp zero", json!({"exp":0}), "EXPIRED"),
        ("exp an hour ago", json!({"exp":NOW - 3600}), "EXPIRED"),
        (
            "exp now - leeway - 1",
            json!({"exp":NOW - LEEWAY - 1}),
            "EXPIRED",
        ),
        ("exp now - leeway", json!({"exp":NOW - LEEWAY}), "EXPIRED"),
        (
            "exp now - leeway + 1",
            json!({"exp":NOW - LEEWAY + 1}),
            "OK",
        ),
        ("exp now", json!({"exp":NOW}), "OK"),
        ("nbf string", json!({"nbf":"0"}), "MALFORMED"),
        ("nbf negative", json!({"nbf":-5}), "MALFORMED"),
        (
            "nbf now + leeway + 1",
            json!({"nbf":NOW + LEEWAY + 1}),
            "NOT_YET_VALID",
        ),
        ("nbf tomorrow", json!({"nbf":NOW + 86_400}), "NOT_YET_VALID"),
        ("nbf now + leeway", json!({"nbf":NOW + LEEWAY}), "OK"),
        ("nbf zero", json!({"nbf":0}), "OK"),
        ("iat string", json!({"iat":"now"}), "MALFORMED"),
        ("iat null", json!({"iat":null}), "OK"),
        (
            "iat now + leeway + 1",
            json!({"iat":NOW + LEEWAY + 1}),
            "NOT_YET_VALID",
        ),
        (
            "iat next year",
            json!({"iat":NOW + 365 * 86_400, "exp":NOW + 365 * 86_400 + 60}),
            "NOT_YET_VALID",
        ),
        ("iat now + leeway", json!({"iat":NOW + LEEWAY}), "OK"),
        ("lifetime = max", json!({"exp":NOW + MAX_LIFETIME}), "OK"),
        (
            "lifetime = max + 1",
            json!({"exp":NOW + MAX_LIFETIME + 1}),
            "MALFORMED",
        ),
        (
            "lifetime ten years",
            json!({"exp":NOW + 10 * 365 * 86_400}),
            "MALFORMED",
        ),
        (
            "no iat, exp beyond max from now",
            json!({"iat":null,"exp":NOW + MAX_LIFETIME + 1}),
            "MALFORMED",
        ),
        (
            "old iat, long lifetime, not expired",
            json!({"iat":NOW - MAX_LIFETIME,"exp":NOW + 10}),
            "MALFORMED",
        ),
    ];
    for (name, patch, want) in cases {
        c.add("time", name, t(patch), want);
    }
}

fn issuers(c: &mut Corpus) {
    let k = good1();
    let h = hdr(json!({}));
    let t = |patch: Value| signed(&k, &h, &claims(patch));
    for (name, iss, want) in [
        ("other issuer", json!("https://evil.test"), "WRONG_ISSUER"),
        (
            "trailing slash",
            json!(format!("{ISSUER}/")),
            "WRONG_ISSUER",
        ),
        ("upper case", json!(ISSUER.to_uppercase()), "WRONG_ISSUER"),
        (
            "prefix",
            json!("https://issuer.corpus.test.evil.test"),
            "WRONG_ISSUER",
        ),
        (
            "nul suffix",
            json!(format!("{ISSUER}\u{0}")),
            "WRONG_ISSUER",
        ),
        ("space suffix", json!(format!("{ISSUER} ")), "WRONG_ISSUER"),
        ("empty", json!(""), "WRONG_ISSUER"),
        ("array", json!([ISSUER]), "MALFORMED"),
        ("number", json!(1), "MALFORMED"),
        ("object", json!({"iss":ISSUER}), "MALFORMED"),
    ] {
        c.add(
            "issuer",
            format!("iss {name}"),
            t(json!({ "iss": iss })),
            want,
        );
    }
    c.add(
        "issuer",
        "iss missing",
        t(json!({"iss":null})),
        "WRONG_ISSUER",
    );
}

fn audiences(c: &mut Corpus) {
    let k = good1();
    let h = hdr(json!({}));
    let t = |patch: Value| signed(&k, &h, &claims(patch));
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("aud string, asked", json!({"aud":"orders"}), "orders", "OK"),
        (
            "aud string, other asked",
            json!({"aud":"orders"}),
            "billing",
            "WRONG_AUDIENCE",
        ),
        (
            "aud array, asked",
            json!({"aud":["billing","orders"]}),
            "orders",
            "OK",
        ),
        (
            "aud array, other asked",
            json!({"aud":["billing","orders"]}),
            "shipping",
            "WRONG_AUDIENCE",
        ),
        (
            "aud empty array, asked",
            json!({"aud":[]}),
            "orders",
            "WRONG_AUDIENCE",
        ),
        ("aud empty array, not asked", json!({"aud":[]}), "", "OK"),
        (
            "aud missing, asked",
            json!({"aud":null}),
            "orders",
            "WRONG_AUDIENCE",
        ),
        ("aud missing, not asked", json!({"aud":null}), "", "OK"),
        (
            "aud case differs",
            json!({"aud":"Orders"}),
            "orders",
            "WRONG_AUDIENCE",
        ),
        (
            "aud prefix",
            json!({"aud":"orders-evil"}),
            "orders",
            "WRONG_AUDIENCE",
        ),
        (
            "aud substring",
            json!({"aud":"ord"}),
            "orders",
            "WRONG_AUDIENCE",
        ),
        (
            "aud comma list",
            json!({"aud":"billing,orders"}),
            "orders",
            "WRONG_AUDIENCE",
        ),
        (
            "aud space list",
            json!({"aud":"billing orders"}),
            "orders",
            "WRONG_AUDIENCE",
        ),
        (
            "aud nested array",
            json!({"aud":[["orders"]]}),
            "orders",
            "MALFORMED",
        ),
        ("aud number", json!({"aud":1}), "", "MALFORMED"),
        ("aud bool", json!({"aud":true}), "orders", "MALFORMED"),
        (
            "aud object",
            json!({"aud":{"orders":true}}),
            "orders",
            "MALFORMED",
        ),
        (
            "aud array with a number",
            json!({"aud":["orders",1]}),
            "orders",
            "MALFORMED",
        ),
        (
            "aud array with null",
            json!({"aud":["orders",null]}),
            "orders",
            "MALFORMED",
        ),
        (
            "aud wildcard",
            json!({"aud":"*"}),
            "orders",
            "WRONG_AUDIENCE",
        ),
    ];
    for (name, patch, asked, want) in cases {
        c.add_aud("audience", name, t(patch), asked, want);
    }
}

fn claim_types(c: &mut Corpus) {
    let k = good1();
    let h = hdr(json!({}));
    let t = |patch: Value| signed(&k, &h, &claims(patch));
    for (name, patch) in [
        ("sub number", json!({"sub":1})),
        ("sub array", json!({"sub":["alice"]})),
        ("sub object", json!({"sub":{"id":"alice"}})),
        ("jti number", json!({"jti":7})),
        ("jti array", json!({"jti":["a"]})),
    ] {
        c.add("claim_types", name, t(patch), "MALFORMED");
    }
}

/// Flips one bit in each of the first 64 bytes of the signed claims: the signature then fails.
fn payload_flips(c: &mut Corpus) {
    let k = good1();
    let h = hdr(json!({}));
    let body = claims(json!({}));
    let input = format!("{}.{}", b64(&h), b64(&body));
    let sig = k.sign(input.as_bytes()).to_bytes();
    for i in 0..64 {
        let mut forged = body.clone();
        forged[i] ^= 1 << (i % 8);
        c.add(
            "claims_bit_flip",
            format!("claims byte {i} bit {}", i % 8),
            with_sig(&h, &forged, &sig),
            "BAD_SIGNATURE",
        );
    }
}

/// All 512 single-bit flips of the baseline token's signature.
fn signature_bit_flips(c: &mut Corpus) {
    let token = good_token();
    let (input, s) = token.rsplit_once('.').expect("three segments");
    let sig = URL_SAFE_NO_PAD.decode(s).expect("base64url");
    for bit in 0..512 {
        let mut flipped = sig.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        c.add(
            "signature_bit_flip",
            format!("bit {bit}"),
            format!("{input}.{}", b64(&flipped)),
            "BAD_SIGNATURE",
        );
    }
}

/// The corpus as committed: pretty JSON with a final newline.
pub fn render() -> String {
    let mut text = serde_json::to_string_pretty(&generate()).expect("json");
    text.push('\n');
    text
}

#[allow(dead_code)]
fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH);
    let text = render();
    std::fs::write(&path, &text).expect("write the corpus");
    let doc: Value = serde_json::from_str(&text).expect("json");
    let cases = doc["cases"].as_array().expect("cases");
    let mut classes = std::collections::BTreeMap::<&str, usize>::new();
    for case in cases {
        *classes
            .entry(case["class"].as_str().expect("class"))
            .or_default() += 1;
    }
    eprintln!("wrote {} cases to {}", cases.len(), path.display());
    for (class, n) in classes {
        eprintln!("  {class:<20} {n}");
    }
}
