//! Money: integer minor units and an ISO 4217 currency with its exponent.

use serde::{Deserialize, Serialize};

/// ISO 4217 codes in circulation (funds codes included) and their minor-unit exponents. Metals,
/// testing and "no currency" codes (XAU, XTS, XXX…) are deliberately absent.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AFN", 2),
    ("ALL", 2),
    ("AMD", 2),
    ("ANG", 2),
    ("AOA", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("AWG", 2),
    ("AZN", 2),
    ("BAM", 2),
    ("BBD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BIF", 0),
    ("BMD", 2),
    ("BND", 2),
    ("BOB", 2),
    ("BOV", 2),
    ("BRL", 2),
    ("BSD", 2),
    ("BTN", 2),
    ("BWP", 2),
    ("BYN", 2),
    ("BZD", 2),
    ("CAD", 2),
    ("CDF", 2),
    ("CHE", 2),
    ("CHF", 2),
    ("CHW", 2),
    ("CLF", 4),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("COU", 2),
    ("CRC", 2),
    ("CUP", 2),
    ("CVE", 2),
    ("CZK", 2),
    ("DJF", 0),
    ("DKK", 2),
    ("DOP", 2),
    ("DZD", 2),
    ("EGP", 2),
    ("ERN", 2),
    ("ETB", 2),
    ("EUR", 2),
    ("FJD", 2),
    ("FKP", 2),
    ("GBP", 2),
    ("GEL", 2),
    ("GHS", 2),
    ("GIP", 2),
    ("GMD", 2),
    ("GNF", 0),
    ("GTQ", 2),
    ("GYD", 2),
    ("HKD", 2),
    ("HNL", 2),
    ("HTG", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("IRR", 2),
    ("ISK", 0),
    ("JMD", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KGS", 2),
    ("KHR", 2),
    ("KMF", 0),
    ("KPW", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("KYD", 2),
    ("KZT", 2),
    ("LAK", 2),
    ("LBP", 2),
    ("LKR", 2),
    ("LRD", 2),
    ("LSL", 2),
    ("LYD", 3),
    ("MAD", 2),
    ("MDL", 2),
    ("MGA", 2),
    ("MKD", 2),
    ("MMK", 2),
    ("MNT", 2),
    ("MOP", 2),
    ("MRU", 2),
    ("MUR", 2),
    ("MVR", 2),
    ("MWK", 2),
    ("MXN", 2),
    ("MXV", 2),
    ("MYR", 2),
    ("MZN", 2),
    ("NAD", 2),
    ("NGN", 2),
    ("NIO", 2),
    ("NOK", 2),
    ("NPR", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PAB", 2),
    ("PEN", 2),
    ("PGK", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("RUB", 2),
    ("RWF", 0),
    ("SAR", 2),
    ("SBD", 2),
    ("SCR", 2),
    ("SDG", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("SHP", 2),
    ("SLE", 2),
    ("SOS", 2),
    ("SRD", 2),
    ("SSP", 2),
    ("STN", 2),
    ("SVC", 2),
    ("SYP", 2),
    ("SZL", 2),
    ("THB", 2),
    ("TJS", 2),
    ("TMT", 2),
    ("TND", 3),
    ("TOP", 2),
    ("TRY", 2),
    ("TTD", 2),
    ("TWD", 2),
    ("TZS", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("USN", 2),
    ("UYI", 0),
    ("UYU", 2),
    ("UYW", 4),
    ("UZS", 2),
    ("VED", 2),
    ("VES", 2),
    ("VND", 0),
    ("VUV", 0),
    ("WST", 2),
    ("XAF", 0),
    ("XCD", 2),
    ("XCG", 2),
    ("XOF", 0),
    ("XPF", 0),
    ("YER", 2),
    ("ZAR", 2),
    ("ZMW", 2),
    ("ZWG", 2),
];

/// An ISO 4217 currency, stored lower case as Medusa does (`"eur"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

impl Currency {
    /// Parses a code in any case; `None` for anything not in ISO 4217's active list.
    pub fn parse(code: &str) -> Option<Currency> {
        let upper = code.to_ascii_uppercase();
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == upper)
            .map(|(c, e)| Currency {
                code: c
                    .to_ascii_lowercase()
                    .as_bytes()
                    .try_into()
                    .expect("3 letters"),
                exponent: *e,
            })
    }

    /// The lower-case code.
    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).expect("ASCII")
    }

    /// Digits after the decimal point (JPY 0, EUR 2, KWD 3).
    pub fn exponent(&self) -> u8 {
        self.exponent
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = String::deserialize(d)?;
        Currency::parse(&code).ok_or_else(|| {
            serde::de::Error::custom(format!("`{code}` is not an ISO 4217 currency code"))
        })
    }
}

/// An amount in minor units of a currency. Always positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Minor units (cents for EUR, yen for JPY).
    pub amount: i64,
    /// The currency.
    pub currency: Currency,
}

/// Why an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not an ISO 4217 code.
    #[error("`{0}` is not an ISO 4217 currency code")]
    UnknownCurrency(String),
    /// Zero or negative.
    #[error("amount must be a positive integer in minor units, got {0}")]
    NotPositive(i64),
    /// Beyond what payhost stores (2^53, so every amount is exact in JSON clients too).
    #[error("amount {0} is too large (at most {MAX_AMOUNT} minor units)")]
    TooLarge(i64),
    /// Two amounts in different currencies.
    #[error("currency mismatch: {expected} expected, {got} given")]
    Mismatch {
        /// The currency in force.
        expected: Currency,
        /// The one given.
        got: Currency,
    },
}

/// The largest amount payhost accepts: 2^53 − 1, exact in every JSON client.
pub const MAX_AMOUNT: i64 = (1 << 53) - 1;

impl Money {
    /// A positive amount in a known currency.
    pub fn new(amount: i64, currency: &str) -> Result<Money, MoneyError> {
        let currency = Currency::parse(currency)
            .ok_or_else(|| MoneyError::UnknownCurrency(currency.into()))?;
        Money::of(amount, currency)
    }

    /// A positive amount in `currency`.
    pub fn of(amount: i64, currency: Currency) -> Result<Money, MoneyError> {
        if amount <= 0 {
            return Err(MoneyError::NotPositive(amount));
        }
        if amount > MAX_AMOUNT {
            return Err(MoneyError::TooLarge(amount));
        }
        Ok(Money { amount, currency })
    }

    /// Checks that `other` is in the same currency.
    pub fn same_currency(&self, other: Currency) -> Result<(), MoneyError> {
        if self.currency == other {
            Ok(())
        } else {
            Err(MoneyError::Mismatch {
                expected: self.currency,
                got: other,
            })
        }
    }
}

/// Adds amounts, refusing overflow.
pub fn checked_sum(amounts: impl IntoIterator<Item = i64>) -> Option<i64> {
    amounts
        .into_iter()
        .try_fold(0i64, |acc, a| acc.checked_add(a))
}

#[cfg(test)]
mod tests {
    use super::{Currency, Money, MoneyError, checked_sum};

    #[test]
    fn exponents_come_from_the_table() {
        assert_eq!(Currency::parse("JPY").unwrap().exponent(), 0);
        assert_eq!(Currency::parse("eur").unwrap().exponent(), 2);
        assert_eq!(Currency::parse("KWD").unwrap().exponent(), 3);
        assert_eq!(Currency::parse("eur").unwrap().code(), "eur");
        assert!(Currency::parse("xau").is_none());
        assert!(Currency::parse("euro").is_none());
    }

    #[test]
    fn bad_amounts_are_refused() {
        assert_eq!(Money::new(0, "eur"), Err(MoneyError::NotPositive(0)));
        assert_eq!(Money::new(-5, "eur"), Err(MoneyError::NotPositive(-5)));
        assert!(matches!(
            Money::new(i64::MAX, "eur"),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(matches!(
            Money::new(1, "zzz"),
            Err(MoneyError::UnknownCurrency(_))
        ));
        assert_eq!(checked_sum([i64::MAX, 1]), None);
    }
}
