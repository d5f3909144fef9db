//! The stored text of an observation row: the JSON object JSONL output carries,
//! written once when a poll is recorded and copied out unchanged at export.
//!
//! [`observation_row`] writes the same bytes as `serde_json` does for the derived
//! `Serialize` of [`Observation`] (a property test holds it to that), but it is on
//! the hot path of recording polls, so it writes each field directly from the
//! borrowed [`RowFields`] (the poll's own detail, not a copy of it), copies strings
//! that need no escaping in one piece, and splices the order's stored input object
//! in as text instead of parsing and re-encoding it. Strings that do need escaping
//! still go through `serde_json`.

use std::fmt::Write;

use chrono::{DateTime, Utc};

#[cfg(doc)]
use crate::model::Observation;
use crate::model::{PayDetail, PayStatus, Tracking, push_rfc3339, push_rfc3339_millis};

/// Observation rows are about this long (JSON bytes before the input columns).
const ROW_CAPACITY: usize = 1024;

/// An observation's fields, borrowed from where they are held: the [`Observation`]
/// they make up, minus its input columns.
#[derive(Debug, Clone, Copy)]
pub struct RowFields<'a> {
    pub provider: &'a str,
    pub order_no: &'a str,
    pub status: PayStatus,
    pub settled: bool,
    pub tracking: Tracking,
    /// `provider_status` and the detail columns; its own `status` is not read.
    pub detail: &'a PayDetail,
    pub observed_at: DateTime<Utc>,
    pub first_seen_at: DateTime<Utc>,
    pub polls: u32,
    pub error: Option<&'a str>,
}

/// `,"name":` (or `{"name":` for the `first` field) as one literal, so that a
/// field's separator and key are a single copy. Names are plain ASCII identifiers,
/// which JSON needs no escaping for.
macro_rules! key {
    (first $name:literal) => {
        concat!("{\"", $name, "\":")
    };
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// The JSONL text of the observation `f` with `input` (the order's input columns
/// as the JSON object [`crate::model::InputJson`] holds) as its `input` field:
/// what `serde_json` writes for that [`Observation`]. Input text that is not an
/// object is refused.
pub fn observation_row(f: &RowFields<'_>, input: &str) -> Result<String, String> {
    if !(input.starts_with('{') && input.ends_with('}')) {
        return Err(format!(
            "stored input columns are not a JSON object: {input}"
        ));
    }
    let d = f.detail;
    let mut w = Row(String::with_capacity(ROW_CAPACITY + input.len()));
    // Field order is the derive's: `Observation`'s declaration order.
    w.raw(key!(first "provider"));
    w.string(f.provider);
    w.raw(key!("order_no"));
    w.string(f.order_no);
    w.raw(key!("status"));
    w.string(f.status.as_str());
    w.raw(key!("provider_status"));
    w.string(&d.provider_status);
    w.raw(key!("settled"));
    w.raw(if f.settled { "true" } else { "false" });
    w.raw(key!("tracking"));
    w.string(f.tracking.as_str());
    w.raw(key!("amount"));
    w.opt(d.amount.as_ref().map(|a| a.as_str()));
    w.raw(key!("currency"));
    w.opt(d.currency.as_deref());
    w.raw(key!("quote_amount"));
    w.opt(d.quote_amount.as_ref().map(|a| a.as_str()));
    w.raw(key!("quote_currency"));
    w.opt(d.quote_currency.as_deref());
    w.raw(key!("expected_amount"));
    w.opt(d.expected_amount.as_ref().map(|a| a.as_str()));
    w.raw(key!("payment_no"));
    w.opt(d.payment_no.as_deref());
    w.raw(key!("payment_method"));
    w.opt(d.payment_method.as_deref());
    w.raw(key!("tx_hash"));
    w.opt(d.tx_hash.as_deref());
    w.raw(key!("from_address"));
    w.opt(d.from_address.as_deref());
    w.raw(key!("to_address"));
    w.opt(d.to_address.as_deref());
    w.raw(key!("chain_id"));
    w.opt(d.chain_id.as_deref());
    w.raw(key!("paid_account"));
    w.opt(d.paid_account.as_deref());
    w.raw(key!("created_at"));
    w.time(d.created_at, push_rfc3339);
    w.raw(key!("paid_at"));
    w.time(d.paid_at, push_rfc3339);
    w.raw(key!("observed_at"));
    w.time(Some(f.observed_at), push_rfc3339_millis);
    w.raw(key!("first_seen_at"));
    w.time(Some(f.first_seen_at), push_rfc3339_millis);
    w.raw(key!("polls"));
    write!(w.0, "{}", f.polls).expect("writing to a String cannot fail");
    w.raw(key!("error"));
    w.opt(f.error);
    w.raw(key!("input"));
    w.raw(input);
    w.0.push('}');
    Ok(w.0)
}

/// A row being written.
struct Row(String);

impl Row {
    fn raw(&mut self, text: &str) {
        self.0.push_str(text);
    }

    /// A JSON string: copied as it is when nothing in it needs escaping, else
    /// escaped by `serde_json`.
    fn string(&mut self, s: &str) {
        if needs_escape(s.as_bytes()) {
            let escaped = serde_json::to_string(s).expect("a string always encodes");
            self.0.push_str(&escaped);
        } else {
            self.0.push('"');
            self.0.push_str(s);
            self.0.push('"');
        }
    }

    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.string(s),
            None => self.raw("null"),
        }
    }

    /// A time as a JSON string, written by `push` straight into the row (RFC 3339
    /// text needs no escaping), or `null`.
    fn time(&mut self, t: Option<DateTime<Utc>>, push: fn(&mut String, DateTime<Utc>)) {
        match t {
            Some(t) => {
                self.0.push('"');
                push(&mut self.0, t);
                self.0.push('"');
            }
            None => self.raw("null"),
        }
    }
}

/// Whether JSON needs any byte of `s` escaped: a quote, a backslash or a control
/// character (what `serde_json` escapes; it leaves DEL and non-ASCII as they are).
/// No early exit, so the compiler turns the loop into vector compares.
fn needs_escape(s: &[u8]) -> bool {
    s.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Amount, InputJson, Observation};
    use chrono::{DateTime, Utc};
    use proptest::prelude::*;

    fn time(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    /// The detail `obs` was made from.
    fn detail_of(obs: &Observation) -> PayDetail {
        PayDetail {
            provider_status: obs.provider_status.clone(),
            status: obs.status,
            amount: obs.amount.clone(),
            currency: obs.currency.clone(),
            quote_amount: obs.quote_amount.clone(),
            quote_currency: obs.quote_currency.clone(),
            expected_amount: obs.expected_amount.clone(),
            payment_no: obs.payment_no.clone(),
            payment_method: obs.payment_method.clone(),
            tx_hash: obs.tx_hash.clone(),
            from_address: obs.from_address.clone(),
            to_address: obs.to_address.clone(),
            chain_id: obs.chain_id.clone(),
            paid_account: obs.paid_account.clone(),
            created_at: obs.created_at,
            paid_at: obs.paid_at,
        }
    }

    /// The row fields of `obs`, with `detail` from [`detail_of`].
    fn fields<'a>(obs: &'a Observation, detail: &'a PayDetail) -> RowFields<'a> {
        RowFields {
            provider: &obs.provider,
            order_no: &obs.order_no,
            status: obs.status,
            settled: obs.settled,
            tracking: obs.tracking,
            detail,
            observed_at: obs.observed_at,
            first_seen_at: obs.first_seen_at,
            polls: obs.polls,
            error: obs.error.as_deref(),
        }
    }

    #[test]
    fn escaping_is_detected_exactly() {
        for b in 0u8..=255 {
            let want = b < 0x20 || b == b'"' || b == b'\\';
            assert_eq!(needs_escape(&[b]), want, "{b:#04x}");
            // Anywhere in a longer string, past a vector's width.
            let mut long = vec![b'a'; 70];
            long[67] = b;
            assert_eq!(needs_escape(&long), want, "{b:#04x} at 67");
        }
    }

    /// Text with what JSON escapes (quotes, backslashes, controls) and what it
    /// does not (DEL, non-ASCII, U+2028).
    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 .:_-]{0,40}|[\"\\\\\u{0}-\u{1f}\u{7f}é€\u{2028}😀a]{0,12}|\\PC{0,20}"
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(text())
    }

    fn opt_amount() -> impl Strategy<Value = Option<Amount>> {
        proptest::option::of("-?[0-9]{1,30}(\\.[0-9]{1,20})?")
            .prop_map(|a| a.map(|a| Amount::parse_decimal(&a).unwrap()))
    }

    /// Milliseconds across years 1970–9999, and whole seconds (written without
    /// a fraction where the schema keeps only given sub-seconds).
    fn millis() -> impl Strategy<Value = i64> {
        prop_oneof![
            0i64..253_402_300_799_999,
            (0i64..253_402_300_799).prop_map(|s| s * 1000)
        ]
    }

    prop_compose! {
        fn observation()(
            provider in text(),
            order_no in text(),
            status in proptest::sample::select(PayStatus::ALL.to_vec()),
            provider_status in text(),
            settled in any::<bool>(),
            tracking in proptest::sample::select(vec![Tracking::Settled, Tracking::Polling, Tracking::Deadline]),
            amounts in (opt_amount(), opt_amount(), opt_amount()),
            texts in (opt_text(), opt_text(), opt_text(), opt_text(), opt_text(), opt_text(), opt_text(), opt_text(), opt_text(), opt_text()),
            created_at in proptest::option::of(millis()),
            paid_at in proptest::option::of(millis()),
            observed_at in millis(),
            first_seen_at in millis(),
            polls in any::<u32>(),
            input in proptest::collection::vec((text(), text()), 0..4),
        ) -> Observation {
            let (amount, quote_amount, expected_amount) = amounts;
            let (currency, quote_currency, payment_no, payment_method, tx_hash, from_address, to_address, chain_id, paid_account, error) = texts;
            Observation {
                provider, order_no, status, provider_status, settled, tracking,
                amount, currency, quote_amount, quote_currency, expected_amount,
                payment_no, payment_method, tx_hash, from_address, to_address,
                chain_id, paid_account,
                created_at: created_at.map(time),
                paid_at: paid_at.map(time),
                observed_at: time(observed_at),
                first_seen_at: time(first_seen_at),
                polls, error, input,
            }
        }
    }

    proptest! {
        /// Byte for byte what serde_json writes for the whole observation, with
        /// the stored input object spliced in.
        #[test]
        fn rows_are_serde_json_encodings(obs in observation()) {
            let stored = InputJson::from_columns(obs.input.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            prop_assert_eq!(stored.columns(), obs.input.clone());
            let detail = detail_of(&obs);
            let row = observation_row(&fields(&obs, &detail), stored.as_str()).unwrap();
            prop_assert_eq!(row, serde_json::to_string(&obs).unwrap());
        }
    }

    #[test]
    fn input_that_is_not_an_object_is_refused() {
        let obs: Observation = serde_json::from_value(serde_json::json!({
            "provider": "payprotocol", "order_no": "A", "status": "paid",
            "provider_status": "3", "settled": true, "tracking": "settled",
            "amount": null, "currency": null, "quote_amount": null,
            "quote_currency": null, "expected_amount": null, "payment_no": null,
            "payment_method": null, "tx_hash": null, "from_address": null,
            "to_address": null, "chain_id": null, "paid_account": null,
            "created_at": null, "paid_at": null,
            "observed_at": "2026-01-01T00:00:00.000Z",
            "first_seen_at": "2026-01-01T00:00:00.000Z",
            "polls": 1, "error": null, "input": {}
        }))
        .unwrap();
        let detail = detail_of(&obs);
        let f = fields(&obs, &detail);
        assert!(observation_row(&f, "{}").is_ok());
        for bad in ["", "[]", r#"["a","b"]"#, "{", "null"] {
            assert!(observation_row(&f, bad).is_err(), "{bad}");
        }
    }
}
