//! How a setting's text becomes its value: durations, timeouts, counts,
//! addresses. Each parser returns the problem; [`Setting`] names the setting.
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;

use super::ConfigError;

/// A clap value parser from a function of the text that returns the value
/// or the problem with it. A failure is a [`ConfigError`] (the source of
/// clap's error) named by the setting's environment variable, or by its
/// flag when it has none: `TASKQL_LISTEN: 'x' is not an address …`.
#[derive(Clone, Copy)]
pub struct Setting<T>(pub fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Setting<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let setting = arg
            .and_then(|arg| {
                arg.get_env()
                    .map(|env| env.to_string_lossy().into_owned())
                    .or_else(|| arg.get_long().map(|long| format!("--{long}")))
            })
            .unwrap_or_else(|| "a setting".into());
        let parse = self.0;
        let named =
            move |text: &str| parse(text).map_err(|problem| ConfigError::new(&setting, problem));
        named.parse_ref(cmd, arg, value)
    }
}

/// The [`ConfigError`] behind a command line that did not parse, if a
/// setting's value was the problem.
pub fn setting_error(err: &clap::Error) -> Option<&ConfigError> {
    std::error::Error::source(err).and_then(|source| source.downcast_ref::<ConfigError>())
}

/// The longest retention or token lifetime, in days (100 years).
pub const MAX_DURATION_DAYS: u64 = 36_500;

/// Why a duration cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DurationError {
    /// Not `<digits><s|m|h|d>`, or zero.
    Malformed,
    /// Well-formed, but too many seconds to count.
    TooLong,
}

/// The seconds in `45s`, `15m`, `12h`, `30d` (a bare number is seconds).
fn duration_seconds(text: &str) -> Result<u64, DurationError> {
    use std::num::IntErrorKind;
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|err: std::num::ParseIntError| match err.kind() {
            IntErrorKind::PosOverflow => DurationError::TooLong,
            _ => DurationError::Malformed,
        })?;
    let per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(DurationError::Malformed),
    };
    let seconds = n.checked_mul(per_unit).ok_or(DurationError::TooLong)?;
    if seconds == 0 {
        return Err(DurationError::Malformed);
    }
    // Whatever is parsed here may be added to or taken from a chrono time.
    i64::try_from(seconds)
        .ok()
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or(DurationError::TooLong)?;
    Ok(seconds)
}

/// Parses `45s`, `15m`, `12h`, `30d` (a bare number is seconds). `None` for
/// zero, for anything else, and for more seconds than a `chrono::Duration`
/// holds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    duration_seconds(text).ok().map(Duration::from_secs)
}

/// Like [`parse_duration`], but at most [`MAX_DURATION_DAYS`]; the error is
/// the problem, to follow the setting's name.
pub fn parse_bounded_duration(text: &str) -> Result<Duration, String> {
    match duration_seconds(text) {
        Ok(seconds) if seconds <= MAX_DURATION_DAYS * 86_400 => Ok(Duration::from_secs(seconds)),
        Err(DurationError::Malformed) => {
            Err(format!("'{text}' is not a duration like 30d, 12h or 90m"))
        }
        Ok(_) | Err(DurationError::TooLong) => Err(format!(
            "'{text}' is too long; at most {MAX_DURATION_DAYS}d (100 years)"
        )),
    }
}

/// The longest timeout a setting may have: an hour.
const MAX_TIMEOUT_SECS: u64 = 3600;

/// A timeout like `3s`, `500ms` or `2m`, from 1 ms to an hour.
pub fn timeout(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let parsed = match trimmed.strip_suffix("ms") {
        Some(millis) => millis.parse::<u64>().ok().map(Duration::from_millis),
        None => duration_seconds(trimmed).ok().map(Duration::from_secs),
    };
    match parsed {
        Some(timeout) if !timeout.is_zero() && timeout.as_secs() <= MAX_TIMEOUT_SECS => Ok(timeout),
        _ => Err(format!(
            "'{text}' is not a timeout like 3s, 500ms or 2m (at most 1h)"
        )),
    }
}

/// A whole number from 1 to `max`.
pub fn positive(text: &str, max: u64) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("'{text}' is not a whole number from 1 to {max}")),
    }
}

/// An address to listen on, like `127.0.0.1:8000`.
pub fn address(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("'{text}' is not an address like 127.0.0.1:8000"))
}

/// The value of an optional setting, which when given must not be blank:
/// an empty variable is a mistake, not a way to unset it. `hint` follows
/// the problem.
pub fn not_blank(text: &str, hint: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err(format!("is set but empty; {hint}"))
    } else {
        Ok(text.to_owned())
    }
}

/// A path that, when given, must not be blank.
pub fn path(text: &str, hint: &str) -> Result<PathBuf, String> {
    not_blank(text, hint).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30d"),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Some(Duration::from_secs(45)));
        for bad in ["", "0s", "d", "3w", "-1h", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations_beyond_chrono_are_rejected() {
        // chrono::Duration holds at most i64::MAX milliseconds.
        let max = i64::MAX as u64 / 1000;
        assert_eq!(
            parse_duration(&max.to_string()),
            Some(Duration::from_secs(max))
        );
        for huge in [
            (max + 1).to_string(),
            u64::MAX.to_string(),
            "99999999999999999999d".into(),
            "100000000000000d".into(),
            "3000000000000000h".into(),
        ] {
            assert_eq!(parse_duration(&huge), None, "{huge}");
            let problem = parse_bounded_duration(&huge).expect_err(&huge);
            assert!(problem.contains("too long"), "{huge}: {problem}");
        }
    }

    #[test]
    fn bounded_durations_stop_at_100_years() {
        assert_eq!(
            parse_bounded_duration("36500d"),
            Ok(Duration::from_secs(36_500 * 86_400))
        );
        assert_eq!(
            parse_bounded_duration("12h"),
            Ok(Duration::from_secs(43_200))
        );
        // Within chrono's range, but not a sensible retention or lifetime.
        assert!(parse_duration("100000000d").is_some());
        for long in ["36501d", "876001h", "100000000d"] {
            let problem = parse_bounded_duration(long).expect_err(long);
            assert_eq!(
                problem,
                format!("'{long}' is too long; at most 36500d (100 years)")
            );
        }
        for bad in ["", "0s", "forever", "1.5h"] {
            let problem = parse_bounded_duration(bad).expect_err(bad);
            assert!(problem.contains("is not a duration"), "{bad}: {problem}");
        }
    }

    #[test]
    fn timeouts_take_milliseconds_to_an_hour() {
        assert_eq!(timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(timeout("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(timeout(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(timeout("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(timeout("10"), Ok(Duration::from_secs(10)));
        for bad in ["", "0ms", "0s", "61m", "2h", "1.5s", "soon", "-3s"] {
            let problem = timeout(bad).expect_err(bad);
            assert_eq!(
                problem,
                format!("'{bad}' is not a timeout like 3s, 500ms or 2m (at most 1h)")
            );
        }
    }

    #[test]
    fn counts_are_whole_and_bounded() {
        assert_eq!(positive(" 7 ", 10), Ok(7));
        for bad in ["0", "11", "-1", "x", ""] {
            assert_eq!(
                positive(bad, 10),
                Err(format!("'{bad}' is not a whole number from 1 to 10"))
            );
        }
    }
}
