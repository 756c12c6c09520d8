//! Time series from CSV files: a timestamp column and a value column, checked for gaps.
//!
//! Timestamps may be years (`1700`), dates as `YYYYMMDD`, `YYYY-MM-DD`, `YYYY/MM/DD`,
//! months as `YYYY-MM`, or `Mon-D-YYYY` (`Jan-1-1995`). The sampling step is inferred
//! (yearly, monthly, or a number of days such as 7 for weekly data); a timestamp that is not a
//! whole number of steps after the previous one is an error, and skipped steps become missing
//! values. Missing values (skipped steps, empty or `NA` cells) are reported and filled only on
//! request ([`Fill::Linear`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::csv::split_fields;
use crate::error::{Error, Result};

/// The sampling step of a series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "unit", content = "step")]
pub enum Frequency {
    /// One value per year.
    Yearly,
    /// One value per month (same day of month).
    Monthly,
    /// One value every `n` days (7: weekly).
    Days(u32),
}

impl Frequency {
    /// The usual seasonal period in steps: 12 for monthly, 52 for weekly, 7 for daily, 1
    /// (no season: the naive forecast) otherwise.
    pub fn default_season(self) -> usize {
        match self {
            Frequency::Monthly => 12,
            Frequency::Days(7) => 52,
            Frequency::Days(1) => 7,
            _ => 1,
        }
    }

    /// A short name (`yearly`, `monthly`, `weekly`, `daily`, `every N days`).
    pub fn name(self) -> String {
        match self {
            Frequency::Yearly => "yearly".into(),
            Frequency::Monthly => "monthly".into(),
            Frequency::Days(1) => "daily".into(),
            Frequency::Days(7) => "weekly".into(),
            Frequency::Days(n) => format!("every {n} days"),
        }
    }
}

/// A timestamp: the position of a step on the series' own axis (years, months since year 0,
/// or days since 1970-01-01).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp(pub i64);

impl Stamp {
    /// The timestamp `steps` steps later.
    pub fn advance(self, freq: Frequency, steps: i64) -> Stamp {
        match freq {
            Frequency::Yearly | Frequency::Monthly => Stamp(self.0 + steps),
            Frequency::Days(n) => Stamp(self.0 + steps * n as i64),
        }
    }

    /// ISO form: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
    pub fn format(self, freq: Frequency) -> String {
        match freq {
            Frequency::Yearly => format!("{}", self.0),
            Frequency::Monthly => format!("{}-{:02}", self.0.div_euclid(12), self.0.rem_euclid(12) + 1),
            Frequency::Days(_) => {
                let (y, m, d) = civil_from_days(self.0);
                format!("{y}-{m:02}-{d:02}")
            }
        }
    }
}

/// What to do with missing values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Refuse a series with missing values (the error says how many and where).
    #[default]
    None,
    /// Linear interpolation between the neighbouring values (the nearest value at the ends).
    Linear,
}

impl std::str::FromStr for Fill {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Fill::None),
            "linear" => Ok(Fill::Linear),
            _ => Err(format!("unknown fill `{s}` (none, linear)")),
        }
    }
}

/// A regularly sampled series.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The value column's name.
    pub column: String,
    /// The sampling step.
    pub freq: Frequency,
    /// Timestamp of every value (consecutive steps).
    pub times: Vec<Stamp>,
    /// The values (missing ones filled).
    pub values: Vec<f32>,
    /// How many values were missing and filled (skipped timestamps and empty cells).
    pub filled: usize,
}

impl Series {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when the series has no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Reads a series from a CSV file (see [`parse_series`]).
pub fn read_series(path: &Path, column: Option<&str>, fill: Fill) -> Result<Series> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_series(&text, &path.display().to_string(), column, fill)
}

/// A date with the precision it was written in.
enum Date {
    Year(i64),
    Month(i64, u32),
    Day(i64, u32, u32),
}

/// Parses CSV text with a header: the first column holds timestamps, `column` (default: the
/// last column) the values. `name` is used in errors (`file: line N: …`).
pub fn parse_series(text: &str, name: &str, column: Option<&str>, fill: Fill) -> Result<Series> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| Error::format(name, "empty file"))?;
    let header: Vec<String> = split_fields(header).iter().map(|f| unquote(f).to_string()).collect();
    if header.len() < 2 {
        return Err(Error::format(name, "the header needs a timestamp column and a value column"));
    }
    let col = match column {
        Some(c) => header.iter().position(|h| h == c).ok_or_else(|| Error::format(name, format!("no column `{c}` (columns: {})", header.join(", "))))?,
        None => header.len() - 1,
    };
    if col == 0 {
        return Err(Error::format(name, format!("column `{}` is the timestamp column", header[0])));
    }
    let (mut dates, mut raw) = (Vec::new(), Vec::new());
    for (i, line) in lines {
        let fields = split_fields(line);
        if fields.len() != header.len() {
            return Err(Error::format(name, format!("line {}: {} fields, the header has {}", i + 1, fields.len(), header.len())));
        }
        let t = unquote(fields[0]);
        let date = parse_date(t)
            .ok_or_else(|| Error::format(name, format!("line {}: `{t}` is not a timestamp (YYYY, YYYYMMDD, YYYY-MM-DD, YYYY-MM or Mon-D-YYYY)", i + 1)))?;
        let v = unquote(fields[col]);
        let value = if v.is_empty() || v.eq_ignore_ascii_case("na") || v.eq_ignore_ascii_case("nan") {
            f32::NAN
        } else {
            let x: f32 = v.parse().map_err(|_| Error::format(name, format!("line {}, column `{}`: `{v}` is not a number", i + 1, header[col])))?;
            if !x.is_finite() {
                return Err(Error::NonFinite { path: name.to_string(), row: i + 1, col: col + 1 });
            }
            x
        };
        dates.push((i + 1, date));
        raw.push(value);
    }
    if dates.len() < 2 {
        return Err(Error::format(name, format!("{} values: a series needs at least 2", dates.len())));
    }
    let (freq, stamps) = axis(&dates, name)?;
    // lay the values on the regular axis; skipped steps are missing
    let step = |a: Stamp, b: Stamp| match freq {
        Frequency::Days(n) => (b.0 - a.0) / n as i64,
        _ => b.0 - a.0,
    };
    let total = step(stamps[0], stamps[stamps.len() - 1]) as usize + 1;
    // a series whose gaps outnumber its values is a misread timestamp column, not data to fill
    if total > 2 * stamps.len() + 10_000 {
        return Err(Error::format(
            name,
            format!(
                "the timestamps {} … {} span {total} {} steps for {} values: more than half would be missing (check the timestamp column)",
                stamps[0].format(freq),
                stamps[stamps.len() - 1].format(freq),
                freq.name(),
                stamps.len()
            ),
        ));
    }
    let mut values = vec![f32::NAN; total];
    for (s, v) in stamps.iter().zip(&raw) {
        values[step(stamps[0], *s) as usize] = *v;
    }
    let times: Vec<Stamp> = (0..total as i64).map(|k| stamps[0].advance(freq, k)).collect();
    let missing: Vec<usize> = (0..total).filter(|&k| values[k].is_nan()).collect();
    if !missing.is_empty() {
        if fill == Fill::None {
            return Err(Error::format(
                name,
                format!(
                    "{} of {total} {} values missing (first at {}); pass --fill linear to interpolate them",
                    missing.len(),
                    freq.name(),
                    times[missing[0]].format(freq)
                ),
            ));
        }
        if missing.len() == total {
            return Err(Error::format(name, format!("column `{}` has no values", header[col])));
        }
        fill_linear(&mut values);
    }
    Ok(Series { column: header[col].clone(), freq, times, values, filled: missing.len() })
}

fn unquote(s: &str) -> &str {
    s.trim().trim_matches('"').trim()
}

/// Infers the step from the timestamps and places each on the series axis; checks order.
fn axis(dates: &[(usize, Date)], name: &str) -> Result<(Frequency, Vec<Stamp>)> {
    let all = |f: fn(&Date) -> bool| dates.iter().all(|(_, d)| f(d));
    let (freq, stamps): (Frequency, Vec<(usize, i64)>) = if all(|d| matches!(d, Date::Year(_))) {
        (Frequency::Yearly, dates.iter().map(|(l, d)| (*l, if let Date::Year(y) = d { *y } else { 0 })).collect())
    } else if all(|d| matches!(d, Date::Month(..))) || same_day_monthly(dates) {
        let months = dates
            .iter()
            .map(|(l, d)| {
                let m = match d {
                    Date::Year(y) => y * 12,
                    Date::Month(y, m) | Date::Day(y, m, _) => y * 12 + *m as i64 - 1,
                };
                (*l, m)
            })
            .collect();
        (Frequency::Monthly, months)
    } else {
        let days: Vec<(usize, i64)> = dates
            .iter()
            .map(|(l, d)| {
                let n = match d {
                    Date::Year(y) => days_from_civil(*y, 1, 1),
                    Date::Month(y, m) => days_from_civil(*y, *m, 1),
                    Date::Day(y, m, dd) => days_from_civil(*y, *m, *dd),
                };
                (*l, n)
            })
            .collect();
        // the step: the most common positive difference
        let mut diffs: Vec<i64> = days.windows(2).map(|w| w[1].1 - w[0].1).filter(|&d| d > 0).collect();
        diffs.sort_unstable();
        let mut best = (0i64, 0usize);
        let mut k = 0;
        while k < diffs.len() {
            let run = diffs[k..].iter().take_while(|&&d| d == diffs[k]).count();
            if run > best.1 {
                best = (diffs[k], run);
            }
            k += run;
        }
        let n = u32::try_from(best.0.max(1)).map_err(|_| Error::format(name, "timestamps too far apart"))?;
        (Frequency::Days(n), days)
    };
    let unit = match freq {
        Frequency::Days(n) => n as i64,
        _ => 1,
    };
    for w in stamps.windows(2) {
        let d = w[1].1 - w[0].1;
        if d <= 0 {
            return Err(Error::format(
                name,
                format!("line {}: timestamp not after the previous line's (the rows must be in time order, without duplicates)", w[1].0),
            ));
        }
        if d % unit != 0 {
            return Err(Error::format(name, format!("line {}: {} days after the previous timestamp, not a whole number of {}-day steps", w[1].0, d, unit)));
        }
    }
    Ok((freq, stamps.into_iter().map(|(_, s)| Stamp(s)).collect()))
}

/// Full dates all on the same day of the month, consecutive months apart at least once.
fn same_day_monthly(dates: &[(usize, Date)]) -> bool {
    let mut day = None;
    for (_, d) in dates {
        match d {
            Date::Day(_, _, dd) if day.is_none() || day == Some(*dd) => day = Some(*dd),
            _ => return false,
        }
    }
    dates.windows(2).any(|w| match (&w[0].1, &w[1].1) {
        (Date::Day(y0, m0, _), Date::Day(y1, m1, _)) => (y1 * 12 + *m1 as i64) - (y0 * 12 + *m0 as i64) == 1,
        _ => false,
    })
}

fn parse_date(s: &str) -> Option<Date> {
    let num = |t: &str| -> Option<i64> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let valid = |y: i64, m: i64, d: i64| (1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m as u32) as i64;
    // a year written as a float (1700.0)
    let s = s.strip_suffix(".0").unwrap_or(s);
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        let (y, m, d) = (num(&s[..4])?, num(&s[4..6])?, num(&s[6..])?);
        return valid(y, m, d).then_some(Date::Day(y, m as u32, d as u32));
    }
    if let Some(y) = num(s).filter(|_| s.len() <= 5) {
        return Some(Date::Year(y));
    }
    let parts: Vec<&str> = s.split(['-', '/']).collect();
    match parts.as_slice() {
        [y, m] => {
            let (y, m) = (num(y)?, num(m)?);
            (1..=12).contains(&m).then_some(Date::Month(y, m as u32))
        }
        [a, b, c] => {
            // YYYY-MM-DD (the time of day after a space or `T` is ignored)
            let c = c.split([' ', 'T']).next().unwrap_or(c);
            if let (Some(y), Some(m), Some(d)) = (num(a), num(b), num(c)) {
                if a.len() == 4 {
                    return valid(y, m, d).then_some(Date::Day(y, m as u32, d as u32));
                }
            }
            // Mon-D-YYYY
            const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
            let m = MONTHS.iter().position(|mm| a.get(..3).is_some_and(|p| p.eq_ignore_ascii_case(mm)))? as i64 + 1;
            let (d, y) = (num(b)?, num(c)?);
            valid(y, m, d).then_some(Date::Day(y, m as u32, d as u32))
        }
        _ => None,
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// Fills NaNs by linear interpolation between the nearest values on either side (the nearest
/// value at the ends). At least one value must be finite.
pub fn fill_linear(v: &mut [f32]) {
    let known: Vec<usize> = (0..v.len()).filter(|&i| !v[i].is_nan()).collect();
    let Some((&first, &last)) = known.first().zip(known.last()) else { return };
    for i in 0..first {
        v[i] = v[first];
    }
    for i in last + 1..v.len() {
        v[i] = v[last];
    }
    for w in known.windows(2) {
        let (a, b) = (w[0], w[1]);
        for i in a + 1..b {
            let t = (i - a) as f32 / (b - a) as f32;
            v[i] = v[a] + t * (v[b] - v[a]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_round_trip() {
        for z in [-800_000i64, -1, 0, 1, 59, 11_016, 19_000, 2_000_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn yearly_monthly_weekly_axes() {
        let s = parse_series("\"YEAR\",\"X\"\n1700,5\n1701,11\n1702,16\n", "s", None, Fill::None).unwrap();
        assert_eq!((s.freq, s.values.clone()), (Frequency::Yearly, vec![5.0, 11.0, 16.0]));
        let s = parse_series("DATE,v\nJan-1-1995,1\nFeb-1-1995,2\nApr-1-1995,4\n", "m", Some("v"), Fill::Linear).unwrap();
        assert_eq!((s.freq, s.values.clone(), s.filled), (Frequency::Monthly, vec![1.0, 2.0, 3.0, 4.0], 1));
        assert_eq!(s.times[2].format(s.freq), "1995-03");
        let s = parse_series("date,co2\n19580329,316\n19580405,\n19580412,318\n19580426,320\n", "w", None, Fill::Linear).unwrap();
        assert_eq!(s.freq, Frequency::Days(7));
        assert_eq!(s.values, vec![316.0, 317.0, 318.0, 319.0, 320.0]);
        assert_eq!((s.filled, s.times[4].format(s.freq).as_str()), (2, "1958-04-26"));
    }

    #[test]
    fn missing_values_and_bad_rows_are_one_line_errors() {
        let e = parse_series("date,co2\n19580329,316\n19580405,\n19580412,318\n", "co2.csv", None, Fill::None).unwrap_err().to_string();
        assert!(e.contains("1 of 3 weekly values missing (first at 1958-04-05)") && e.contains("--fill linear"), "{e}");
        for (text, what) in [
            ("t,v\n2001,1\n2000,2\n", "time order"),
            ("t,v\n2001,1\n2002,x\n", "not a number"),
            ("t,v\n2001,1\n2002\n", "fields"),
            ("t,v\nyesterday,1\n2002,1\n", "not a timestamp"),
            ("t,v\n2000-01-01,1\n2000-01-08,1\n2000-01-18,1\n", "whole number"),
            ("t,v\n1700,1\n1701,2\n99999,3\n", "more than half would be missing"),
        ] {
            let e = parse_series(text, "f", None, Fill::Linear).unwrap_err().to_string();
            assert!(e.contains(what) && !e.contains('\n'), "{text:?}: {e}");
        }
        assert!(parse_series("t,v\n2000,1\n", "f", Some("w"), Fill::None).unwrap_err().to_string().contains("no column `w`"));
    }
}
