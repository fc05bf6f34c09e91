//! The hex test vectors in `docs/PROTOCOL.md` are checked here, so the document cannot drift
//! from the code. Each vector is a fenced `hex` block preceded by `<!-- vector: NAME -->`.

use edgetally_core::RejectCode;
use edgetally_proto::{encode_frame, encode_payload, Reply};
use std::collections::BTreeMap;

fn vectors() -> BTreeMap<String, Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("PROTOCOL.md");
    let mut out = BTreeMap::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- vector: ")
            .and_then(|s| s.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(lines.next().map(str::trim), Some("```hex"), "vector {name}");
        let mut hex = String::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            hex.extend(
                l.split('#')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .filter(|c| c.is_ascii_hexdigit()),
            );
        }
        let bytes = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        out.insert(name.to_string(), bytes);
    }
    out
}

#[test]
fn protocol_vectors_match_the_code() {
    let v = vectors();
    let mut checked = 0;
    let all = super::fixtures::fixtures()
        .into_iter()
        .chain(super::fixtures::fixtures_v2());
    for (name, signer, batch) in all {
        if let Some(bytes) = v.get(&format!("batch-{name}")) {
            assert_eq!(*bytes, signer.seal(&batch).expect("seal"), "batch-{name}");
            checked += 1;
        }
        if let Some(bytes) = v.get(&format!("payload-{name}")) {
            assert_eq!(
                *bytes,
                encode_payload(&batch).expect("encode"),
                "payload-{name}"
            );
            checked += 1;
        }
        if let Some(bytes) = v.get(&format!("seed-{name}")) {
            assert_eq!(*bytes, signer.seed().to_vec(), "seed-{name}");
            checked += 1;
        }
    }
    let replies = [
        ("reply-ack", Reply::Ack),
        (
            "reply-nack-bad-signature",
            Reply::nack(RejectCode::BadSignature),
        ),
        ("reply-retry-250", Reply::Retry { after_ms: 250 }),
    ];
    for (name, r) in replies {
        assert_eq!(v.get(name), Some(&r.encode()), "{name}");
        checked += 1;
    }
    assert_eq!(
        v.get("frame-ack"),
        Some(&encode_frame(&Reply::Ack.encode()))
    );
    checked += 1;
    // §8: the credential issuer seed 0x11… grants producer (seed 0x22…) until 1.7e12 ms.
    let issuer_seed = [0x11u8; 32];
    let producer = edgetally_proto::Signer::from_seed([0x22; 32]).producer();
    let cred = edgetally_proto::credential::issue(&issuer_seed, &producer, 1_700_000_000_000);
    if std::env::var("EDGETALLY_PRINT_VECTORS").is_ok() {
        println!("credential: {}", edgetally_net::tls::hex(&cred));
    }
    assert_eq!(v.get("credential"), Some(&cred), "credential");
    let issuer = edgetally_proto::credential::issuer_public(&issuer_seed);
    assert_eq!(
        v.get("credential-issuer"),
        Some(&issuer.to_vec()),
        "credential-issuer"
    );
    assert!(edgetally_proto::credential::verify(&cred, &[issuer], 1_699_999_999_999).is_ok());
    checked += 2;
    // §2: the signature rule's vectors, each `A ‖ signature ‖ M`, named with their verdict.
    for (name, key, msg, sig, want) in super::signatures::vectors() {
        let verdict = if want { "accept" } else { "reject" };
        let doc = v
            .get(&format!("sig-{name}-{verdict}"))
            .unwrap_or_else(|| panic!("PROTOCOL.md lacks sig-{name}-{verdict}"));
        assert_eq!(*doc, [&key[..], &sig[..], &msg].concat(), "sig-{name}");
        let (a, rest) = doc.split_at(32);
        let (sg, m) = rest.split_at(64);
        let a: [u8; 32] = a.try_into().expect("32");
        let sg: [u8; 64] = sg.try_into().expect("64");
        assert_eq!(
            edgetally_proto::verify_signature(&a, m, &sg),
            want,
            "sig-{name}"
        );
        checked += 1;
    }
    // §3: the control-character rule, a whole batch each and the reason a merger gives a
    // producer for it (decoded and verified fine: the rule is applied after the batch's own).
    for (name, cat, ent, want) in control_vectors() {
        let doc = v
            .get(name)
            .unwrap_or_else(|| panic!("PROTOCOL.md lacks {name}"));
        assert_eq!(*doc, control_batch(cat, ent), "{name}");
        let batch = edgetally_proto::decode(doc, &edgetally_core::Limits::default())
            .and_then(|u| u.verify())
            .expect("decodes and verifies");
        assert_eq!(batch.check_names(), Err(want), "{name}");
        checked += 1;
    }
    assert_eq!(checked, v.len(), "every vector in the document is checked");
    assert!(checked >= 7);
}

/// The control-character vectors: name, category, entity, the reason.
fn control_vectors() -> [(&'static str, &'static str, Option<&'static str>, RejectCode); 2] {
    [
        (
            "batch-nul-category-invalid_category",
            "m\u{0}x",
            None,
            RejectCode::InvalidCategory,
        ),
        (
            "batch-tab-entity-invalid_entity",
            "cpu",
            Some("a\tb"),
            RejectCode::InvalidEntity,
        ),
    ]
}

/// A batch as the `minimal` vector (seed 32 × 01, epoch 1, seq 0, created and recorded at
/// 1,700,000,000,000 ms, value 1.5) with the names given — which no SDK builds: the builder
/// refuses them, so they are put into the string table by hand.
fn control_batch(category: &str, entity: Option<&str>) -> Vec<u8> {
    let signer = edgetally_proto::Signer::from_seed([1; 32]);
    let clean = |x: &str| x.replace(|c: char| c.is_control(), "_");
    let mut b = edgetally_proto::BatchBuilder::new(1000).expect("width");
    b.record(
        &clean(category),
        entity.map(clean).as_deref(),
        1_700_000_000_000,
        1.5,
    )
    .expect("record");
    let mut batch = b.finish(
        edgetally_core::BatchId {
            producer: signer.producer(),
            epoch: 1,
            seq: 0,
        },
        1_700_000_000_000,
    );
    batch.strings = batch
        .strings
        .iter()
        .map(|x| {
            if x == clean(category) {
                category.to_string()
            } else if entity.is_some_and(|e| x == clean(e)) {
                entity.unwrap_or(x).to_string()
            } else {
                x.to_string()
            }
        })
        .collect();
    signer.seal(&batch).expect("seal")
}

/// Prints the vectors (for writing the document): `cargo test -p edgetally-tests print_vectors -- --nocapture`.
#[test]
fn print_vectors() {
    if std::env::var("EDGETALLY_PRINT_VECTORS").is_err() {
        return;
    }
    let all = super::fixtures::fixtures()
        .into_iter()
        .chain(super::fixtures::fixtures_v2());
    for (name, signer, batch) in all {
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("seed-{name}: {}", hex(&signer.seed()));
        println!(
            "payload-{name}: {}",
            hex(&encode_payload(&batch).expect("encode"))
        );
        println!("batch-{name}: {}", hex(&signer.seal(&batch).expect("seal")));
    }
    for (name, cat, ent, _) in control_vectors() {
        let b = control_batch(cat, ent);
        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        println!("{name}: {}", hex.join(" "));
    }
}
