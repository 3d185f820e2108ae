/// The `wait` preference of RFC 7240 (`Prefer: wait=10`): how long, in seconds, the client is willing to wait.
public enum WaitPreference {
    /// The seconds of the first `wait` preference among every `Prefer` field value (each a comma-separated list of
    /// `name[=value]` preferences, parameters after `;` ignored; names are case-insensitive, the value may be a
    /// quoted string), or nil when there is none or it is malformed (no value, not delta-seconds): a malformed
    /// preference is ignored, as RFC 7240 lets a server do. Values too large for an Int read as Int.max.
    public static func seconds(inPreferValues values: [String]) -> Int? {
        for value in values {
            for preference in value.split(separator: ",") {
                let nameValue = preference.split(separator: ";", maxSplits: 1, omittingEmptySubsequences: false)[0]
                let parts = nameValue.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                guard parts[0].trimmingOWS.lowercased() == "wait" else { continue }
                guard parts.count == 2 else { return nil }
                var text = Substring(parts[1].trimmingOWS)
                if text.count >= 2, text.first == "\"", text.last == "\"" { text = text.dropFirst().dropLast() }
                guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
                return Int(text) ?? Int.max
            }
        }
        return nil
    }
}
