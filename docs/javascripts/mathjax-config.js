// MathJax 3 (served from this site: tools/build_docs.py copies it from the npm package `mathjax`).
// Notebook markdown keeps TeX between $...$ and $$...$$; the Markdown pages use arithmatex's \(...\) and \[...\].
window.MathJax = {
  tex: {
    inlineMath: [['$', '$'], ['\\(', '\\)']],
    displayMath: [['$$', '$$'], ['\\[', '\\]']],
    processEscapes: true,
    processEnvironments: true,
    tags: 'none'            // numbers come from the paper's own \tag{N}
  },
  options: {skipHtmlTags: ['script', 'noscript', 'style', 'textarea', 'pre', 'code']}
};
