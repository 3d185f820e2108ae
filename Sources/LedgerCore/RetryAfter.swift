import Foundation

/// `Retry-After` (RFC 9110 10.2.3): delta-seconds, or an HTTP-date to wait until.
public enum RetryAfter {
    /// The wait the header asks for, in milliseconds from `now`; 0 for a date in the past, nil for a value that is
    /// neither form (which a client then ignores, as RFC 9110 allows).
    public static func delayMs(_ value: String, now: Date = Date()) -> Int? {
        let text = value.trimmingCharacters(in: .whitespaces)
        if !text.isEmpty, text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) {
            // Absurdly long values saturate instead of overflowing.
            guard let seconds = Int(text), seconds <= Int.max / 1000 else { return Int.max }
            return seconds * 1000
        }
        guard let date = httpDate(text) else { return nil }
        let milliseconds = date.timeIntervalSince(now) * 1000
        return milliseconds <= 0 ? 0 : Int(milliseconds.rounded(.up))
    }

    /// IMF-fixdate, and the two obsolete forms recipients must still accept: RFC 850 and asctime.
    static func httpDate(_ text: String) -> Date? {
        // asctime pads the day with a space (`Nov  6`): compare with single spaces.
        let text = text.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
        for format in formats {
            let formatter = DateFormatter()
            formatter.locale = Locale(identifier: "en_US_POSIX")
            formatter.timeZone = TimeZone(identifier: "GMT")
            formatter.dateFormat = format
            if let date = formatter.date(from: text) { return date }
        }
        return nil
    }

    private static let formats = [
        "EEE, dd MMM yyyy HH:mm:ss 'GMT'",  // Sun, 06 Nov 1994 08:49:37 GMT
        "EEEE, dd-MMM-yy HH:mm:ss 'GMT'",  // Sunday, 06-Nov-94 08:49:37 GMT
        "EEE MMM d HH:mm:ss yyyy",  // Sun Nov  6 08:49:37 1994
    ]
}
